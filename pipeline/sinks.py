"""`python -m pipeline.sinks`: the DLM-vs-AR sink measurement (pipeline/evaluation/sink_report.py)."""
if __name__ == "__main__":
    from pipeline.evaluation.sink_report import main

    main()
