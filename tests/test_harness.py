"""lm-eval support for diffusion LMs: MC likelihood, sampler, offline tasks, evaluate_tasks, CFG, DDP hooks."""
from __future__ import annotations

import copy
import json
import os
import socket
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(1)

from pipeline.evaluation.harness import DiffusionLM, request_seed, rolling_chunks, special_prefix_ids  # noqa: E402
from pipeline.evaluation.likelihood import exact_loglikelihood, mc_loglikelihood, stratified_mask_counts  # noqa: E402
from pipeline.evaluation.sampler import diffusion_generate, guided_logits  # noqa: E402

TASK_DIR = "configs/tasks"
TINY_VOCAB, TINY_MASK = 40, 39


def tiny_bert(vocab_size=TINY_VOCAB, seed=0):
    """A small random bidirectional MLM: logits depend on which positions are masked."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    return BertForMaskedLM(config).eval()


@pytest.fixture(scope="module")
def tiny():
    return tiny_bert()


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from pipeline.model.minilm import wheel_path

    return AutoTokenizer.from_pretrained(wheel_path())


@pytest.fixture(scope="module")
def minilm():
    from pipeline.model.loading import load_dlm

    return load_dlm("minilm-dlm")


def ids(*values):
    return torch.tensor(values, dtype=torch.long)


# ---------------------------------------------------------------------------------------- MC likelihood
def test_stratified_counts_cover_every_k_equally():
    counts = stratified_mask_counts(12, 3, offset=0.37)
    assert sorted(counts.tolist()) == [1] * 4 + [2] * 4 + [3] * 4


@pytest.mark.parametrize("target", [ids(5), ids(5, 17), ids(5, 17, 8)])
def test_mc_estimate_matches_exact_enumeration(tiny, target):
    prompt = ids(1, 2, 3, 4, 6)
    exact = exact_loglikelihood(tiny, prompt, target, TINY_MASK)
    draws = 600 * len(target)
    mc = mc_loglikelihood(tiny, prompt, target, TINY_MASK, mc_num=draws, batch_size=600,
                          generator=torch.Generator().manual_seed(0))
    if len(target) == 1:  # every draw masks the single token: no randomness left
        assert mc == pytest.approx(exact, abs=1e-5)
    else:
        assert mc == pytest.approx(exact, rel=0.01, abs=0.02)


def test_mc_estimate_does_not_depend_on_batching(tiny):
    prompt, target = ids(1, 2, 3), ids(4, 5, 6, 7, 8)
    a = mc_loglikelihood(tiny, prompt, target, TINY_MASK, mc_num=20, batch_size=1,
                         generator=torch.Generator().manual_seed(3))
    b = mc_loglikelihood(tiny, prompt, target, TINY_MASK, mc_num=20, batch_size=7,
                         generator=torch.Generator().manual_seed(3))
    assert a == pytest.approx(b, abs=1e-4)


def test_mc_variance_across_seeds_falls_with_mc_num(tiny):
    prompt, target = ids(1, 2, 3, 4), ids(5, 9, 11, 13, 17, 19, 23, 29)

    def spread(mc_num):
        values = [mc_loglikelihood(tiny, prompt, target, TINY_MASK, mc_num=mc_num, batch_size=64,
                                   generator=torch.Generator().manual_seed(seed)) for seed in range(12)]
        return statistics.stdev(values), statistics.mean(values)

    (sd_small, mean_small), (sd_large, mean_large) = spread(2), spread(64)
    assert sd_large < 0.4 * sd_small
    assert abs(mean_large - mean_small) < 3 * sd_small / 12**0.5 + 3 * sd_large


def test_minilm_ranks_real_continuation_above_garbage(minilm):
    from pipeline.model.corpus import wiki_split

    model, tokenizer = minilm
    lm = DiffusionLM(model=model, tokenizer=tokenizer, mc_num=8, batch_size=8, show_progress=False)
    words = wiki_split("heldout")[0].split()
    generator = torch.Generator().manual_seed(0)
    for start in (0, 600):
        context = " ".join(words[start : start + 40])
        prompt, target = lm._fit(*lm._encode_pair(context, " " + " ".join(words[start + 40 : start + 48])))
        garbage = torch.randint(2000, tokenizer.vocab_size, (len(target),), generator=generator).tolist()
        real_ll, _ = lm.score(prompt, target)
        garbage_ll, garbage_greedy = lm.score(prompt, garbage)
        assert real_ll > garbage_ll + 5.0
        assert not garbage_greedy


def test_requests_are_reproducible_and_seeded(minilm_tokenizer):
    from lm_eval.api.instance import Instance

    model = tiny_bert(vocab_size=minilm_tokenizer.vocab_size)
    lm = DiffusionLM(model=model, tokenizer=minilm_tokenizer, mc_num=4, batch_size=4, show_progress=False)
    assert lm.prefix_ids == [minilm_tokenizer.cls_token_id] == special_prefix_ids(minilm_tokenizer)
    reqs = [Instance("loglikelihood", {}, ("The cat sat on the", " mat by the old door"), i) for i in range(2)]
    first, second = lm.loglikelihood(reqs)
    assert first == second  # same request, same noise
    lm.seed = 1
    assert lm.loglikelihood(reqs[:1])[0][0] != first[0]
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("A short text to score.",), 0)])
    assert rolling[0] < 0


def test_rolling_chunks_score_each_token_once_with_full_context():
    tokens = list(range(10))
    chunks = list(rolling_chunks(tokens, 4))
    assert [t for _, t in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunks[2][0] == [6, 7]  # last chunk keeps as much context as fits


def test_left_truncation_keeps_prefix_and_continuation(minilm_tokenizer):
    lm = DiffusionLM(model=tiny_bert(vocab_size=minilm_tokenizer.vocab_size), tokenizer=minilm_tokenizer,
                     max_length=16, show_progress=False)
    prompt, target = lm._fit(list(range(1000, 1030)), [7, 8, 9])
    assert len(prompt) + len(target) == 16
    assert prompt[0] == minilm_tokenizer.cls_token_id and prompt[-1] == 1029 and target == [7, 8, 9]


# ------------------------------------------------------------------------------------------------- CFG
def test_cfg_zero_is_the_plain_path(tiny, minilm_tokenizer):
    x = ids(1, 2, 3, TINY_MASK, TINY_MASK)[None]
    prompt_mask = torch.tensor([True, True, True, False, False])
    with torch.no_grad():
        plain = tiny(input_ids=x).logits
        assert torch.equal(guided_logits(tiny, x, prompt_mask, TINY_MASK, 0.0), plain)
        nearly_zero = guided_logits(tiny, x, prompt_mask, TINY_MASK, 1e-9)
        guided = guided_logits(tiny, x, prompt_mask, TINY_MASK, 1.0)
        uncond = tiny(input_ids=ids(TINY_MASK, TINY_MASK, TINY_MASK, TINY_MASK, TINY_MASK)[None]).logits
    assert torch.allclose(nearly_zero, plain, atol=1e-5)
    assert torch.allclose(guided, uncond + 2.0 * (plain - uncond), atol=1e-5)

    model = tiny_bert(vocab_size=minilm_tokenizer.vocab_size)
    prompt, target = [101, 2000, 2001, 2002], [2003, 2004]
    plain_lm = DiffusionLM(model=model, tokenizer=minilm_tokenizer, mc_num=8, show_progress=False)
    zero_lm = DiffusionLM(model=model, tokenizer=minilm_tokenizer, mc_num=8, cfg=0.0, show_progress=False)
    cfg_lm = DiffusionLM(model=model, tokenizer=minilm_tokenizer, mc_num=8, cfg=4.0, show_progress=False)
    direct = mc_loglikelihood(model, torch.tensor(prompt), torch.tensor(target), minilm_tokenizer.mask_token_id,
                              mc_num=8, generator=torch.Generator().manual_seed(request_seed(0, "ll", tuple(prompt), 2)))
    assert zero_lm.score(prompt, target)[0] == plain_lm.score(prompt, target)[0] == pytest.approx(direct, abs=1e-6)
    assert cfg_lm.score(prompt, target)[0] != pytest.approx(direct, abs=1e-4)


# --------------------------------------------------------------------------------------------- sampler
class RecordingModel(torch.nn.Module):
    """Wraps a model and keeps a copy of every input it is shown."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, input_ids):
        self.seen.append(input_ids.clone())
        return self.inner(input_ids=input_ids)


@pytest.mark.parametrize("remasking,temperature,gen_length,block_length,steps", [
    ("low_confidence", 0.0, 16, 4, 8),
    ("random", 1.0, 10, 4, 10),
    ("low_confidence", 0.7, 9, 9, 3),
    ("low_confidence", 0.0, 6, 2, 50),  # more steps than tokens: one token per step
])
def test_sampler_fills_masks_keeps_prompt_and_goes_block_by_block(tiny, remasking, temperature, gen_length,
                                                                  block_length, steps):
    spy = RecordingModel(tiny)
    prompt = ids(1, 2, 3, 4, 5)
    out = diffusion_generate(spy, prompt, TINY_MASK, gen_length, block_length, steps, temperature, remasking,
                             torch.Generator().manual_seed(0))
    assert out.shape == (1, 5 + gen_length)
    assert torch.equal(out[0, :5], prompt)
    assert not (out == TINY_MASK).any()
    blocks = [range(5 + s, min(5 + s + block_length, 5 + gen_length)) for s in range(0, gen_length, block_length)]
    states = [x[0] for x in spy.seen] + [out[0]]
    for state in states:
        assert torch.equal(state[:5], prompt)
        done = [bool((state[list(b)] != TINY_MASK).all()) for b in blocks]
        touched = [bool((state[list(b)] != TINY_MASK).any()) for b in blocks]
        for b in range(len(blocks) - 1):
            assert done[b] or not any(touched[b + 1 :]), "a later block was unmasked before this one finished"
    masks_left = [int((s == TINY_MASK).sum()) for s in states]
    assert all(a > b for a, b in zip(masks_left, masks_left[1:]))  # every step commits something
    assert len(spy.seen) == min(steps, gen_length)  # one forward per step, steps shared among blocks


def test_sampler_is_reproducible_with_a_seeded_generator(tiny):
    def run(seed):
        return diffusion_generate(tiny, ids(1, 2, 3), TINY_MASK, 8, 4, 8, 1.0, "random",
                                  torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0))


def test_generate_until_cuts_at_stop_strings(minilm_tokenizer):
    from lm_eval.api.instance import Instance

    model = tiny_bert(vocab_size=minilm_tokenizer.vocab_size)
    lm = DiffusionLM(model=model, tokenizer=minilm_tokenizer, gen_length=8, block_length=4, steps=8,
                     show_progress=False)
    text = lm.generate_until([Instance("generate_until", {}, ("Question: what?", {"until": []}), 0)])[0]
    assert isinstance(text, str)
    if text.strip():
        stop = text.strip().split()[0]
        cut = lm.generate_until([Instance("generate_until", {}, ("Question: what?", {"until": [stop]}), 0)])[0]
        assert stop not in cut and text.startswith(cut)


# ------------------------------------------------------------------------------------- offline tasks
def test_the_harness_finds_the_package_tasks_from_any_folder(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    from pipeline.evaluation.harness import with_package_tasks

    tasks = Path(TASK_DIR).resolve()
    monkeypatch.chdir(tmp_path)  # outside the repository root: configs/tasks is not here
    run = ["--model", "dlm", "--tasks", "wiki_cloze_offline"]
    assert with_package_tasks(run, tasks) == [*run, "--include_path", str(tasks)]
    relative = with_package_tasks([*run, "--include_path", "configs/tasks", "--limit", "4"], tasks)
    assert relative == [*run, "--include_path", str(tasks), "--limit", "4"]
    assert with_package_tasks([*run, "--include_path=configs/tasks"], tasks) == [*run, "--include_path", str(tasks)]
    own = [*run, "--include_path", str(tmp_path)]
    assert with_package_tasks(own, tasks) == own  # the user's own folder, as given
    manager = TaskManager(include_path=relative[relative.index("--include_path") + 1], include_defaults=False)
    assert "wiki_cloze_offline" in manager.all_tasks


def test_offline_task_yamls_load_and_build_docs():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=TASK_DIR, include_defaults=False)
    assert {"mmlu_dev_offline", "wiki_cloze_offline"} <= set(manager.all_tasks)
    tasks = manager.load(["mmlu_dev_offline", "wiki_cloze_offline"])["tasks"]
    mmlu, wiki = tasks["mmlu_dev_offline"], tasks["wiki_cloze_offline"]
    mmlu_docs, wiki_docs = list(mmlu.eval_docs), list(wiki.eval_docs)
    assert len(mmlu_docs) == 282 and len({d["subject"] for d in mmlu_docs}) == 57
    assert mmlu.doc_to_text(mmlu_docs[0]).endswith("Answer:")
    assert all(0 <= mmlu.doc_to_target(d) < len(mmlu.doc_to_choice(d)) for d in mmlu_docs)
    assert sum(len(d["choices"]) == 4 for d in mmlu_docs) == 281
    assert len(wiki_docs) > 300
    for doc in wiki_docs[:50]:
        choices = wiki.doc_to_choice(doc)
        assert len(set(c.lower() for c in choices)) == 4
        assert 60 <= len(wiki.doc_to_text(doc).split()) <= 100


# ----------------------------------------------------------------------------------- evaluate_tasks
ROLLING_TASK = """task: wiki_rolling_test
dataset_path: json
custom_dataset: !function pipeline.evaluation.offline_tasks.wiki_cloze_offline
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{passage}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""


GENERATION_TASK = """task: wiki_generate_test
dataset_path: json
custom_dataset: !function pipeline.evaluation.offline_tasks.wiki_cloze_offline
test_split: test
output_type: generate_until
doc_to_text: "{{passage}}"
doc_to_target: "{{choices[label]}}"
generation_kwargs:
  until: ["."]
metric_list:
  - metric: exact_match
"""


def test_evaluate_tasks_numbers_come_from_the_model(minilm_tokenizer, tmp_path):
    from pipeline.run.outputs import AtomicDir
    from pipeline.evaluation.scoring import evaluate_tasks, render_comparison

    (tmp_path / "wiki_rolling_test.yaml").write_text(ROLLING_TASK)
    (tmp_path / "wiki_generate_test.yaml").write_text(GENERATION_TASK)
    model = tiny_bert(vocab_size=minilm_tokenizer.vocab_size, seed=1)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    specs = [{"name": "wiki_rolling_test", "mc_num": 2}, {"name": "wiki_cloze_offline", "limit": 2},
             {"name": "wiki_generate_test", "gen_length": 4, "steps": 4, "block_length": 2}]
    kwargs = dict(limit=2, mc_num=1, batch_size=4, include_path=[TASK_DIR, str(tmp_path)])
    dense = evaluate_tasks(model, minilm_tokenizer, None, specs, **kwargs)
    again = evaluate_tasks(model, minilm_tokenizer, None, specs[:1], **kwargs)
    pruned = evaluate_tasks(perturbed, minilm_tokenizer, None, specs, **kwargs)
    bpb = dense["wiki_rolling_test"]["metrics"]["bits_per_byte"]["value"]
    assert bpb > 0 and bpb == again["wiki_rolling_test"]["metrics"]["bits_per_byte"]["value"]
    assert bpb != pruned["wiki_rolling_test"]["metrics"]["bits_per_byte"]["value"]
    assert dense["wiki_rolling_test"]["settings"]["mc_num"] == 2 and dense["wiki_rolling_test"]["n_samples"] == 2
    acc = dense["wiki_cloze_offline"]["metrics"]["acc"]
    assert acc["value"] in (0.0, 0.5, 1.0) and acc["stderr"] is not None
    generated = dense["wiki_generate_test"]
    assert generated["settings"]["gen_kwargs"] == {"gen_length": 4, "steps": 4, "block_length": 2}
    assert generated["metrics"]["exact_match"]["value"] in (0.0, 0.5, 1.0)
    table = render_comparison(dense, pruned)
    assert table.row_count == 5  # word_perplexity, bits_per_byte, acc, acc_norm, exact_match
    with AtomicDir(tmp_path / "out") as tmp:
        (tmp / "scores.json").write_text(json.dumps({"dense": dense, "pruned": pruned}, default=str))
    path = tmp_path / "out" / "scores.json"
    assert path.read_text().startswith("{")


# ------------------------------------------------------------------------------------------------ DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str):
    import json

    import lm_eval
    import torch.distributed as dist
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from pipeline.model.minilm import wheel_path

    torch.set_num_threads(1)
    # what torchrun exports; DiffusionLM joins the process group itself
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    tokenizer = AutoTokenizer.from_pretrained(wheel_path())
    lm = DiffusionLM(model=tiny_bert(vocab_size=tokenizer.vocab_size, seed=2), tokenizer=tokenizer, mc_num=2,
                     show_progress=False)
    gathered = lm.all_gather(torch.tensor(rank + 10))
    objects = lm.gather_object({"rank": rank})
    lm.barrier()
    result = lm_eval.simple_evaluate(model=lm, tasks=["wiki_cloze_offline"], limit=4, log_samples=True,
                                     task_manager=TaskManager(include_path=TASK_DIR, include_defaults=False))
    assert dist.is_initialized() and dist.get_backend() == "gloo"
    report = {"rank": lm.rank, "world_size": lm.world_size, "gathered": gathered.tolist(), "objects": objects}
    if result is not None:
        report["samples"] = sorted((s["doc_id"], [float(r[0][0]) for r in s["resps"]])
                                   for s in result["samples"]["wiki_cloze_offline"])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(report, fh)
    dist.destroy_process_group()


def test_ddp_hooks_shard_requests_and_match_single_process(minilm_tokenizer, tmp_path):
    import json

    import lm_eval
    import torch.multiprocessing as mp
    from lm_eval.tasks import TaskManager

    # fork: the workers inherit the imported modules (spawn would re-import lm-eval and transformers)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert (rank0["rank"], rank1["rank"], rank0["world_size"]) == (0, 1, 2)
    assert rank0["gathered"] == rank1["gathered"] == [10, 11]
    assert rank0["objects"] == [{"rank": 0}, {"rank": 1}] and rank1["objects"] is None
    assert "samples" not in rank1

    lm = DiffusionLM(model=tiny_bert(vocab_size=minilm_tokenizer.vocab_size, seed=2), tokenizer=minilm_tokenizer,
                     mc_num=2, show_progress=False)
    single = lm_eval.simple_evaluate(model=lm, tasks=["wiki_cloze_offline"], limit=4, log_samples=True,
                                     task_manager=TaskManager(include_path=TASK_DIR, include_defaults=False))
    expected = sorted((s["doc_id"], [float(r[0][0]) for r in s["resps"]])
                      for s in single["samples"]["wiki_cloze_offline"])
    assert [d for d, _ in rank0["samples"]] == [0, 1, 2, 3]
    for (doc, got), (_, want) in zip(rank0["samples"], expected):
        assert got == pytest.approx(want, abs=1e-4), doc


def test_shell_entry_point_scores_a_saved_checkpoint(tmp_path):
    """`python -m pipeline.evaluation.harness` (= `sinkprune-eval`) is lm-eval's own CLI with `dlm` registered: run it
    as a user would on a saved remote-code checkpoint folder and read lm-eval's result file."""
    import json
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.evaluation.harness", "--model", "dlm",
         "--model_args", f"pretrained={repo / 'pipeline' / 'zoo' / 'tiny_llada'},mc_num=2",
         "--tasks", "wiki_cloze_offline", "--include_path", str(repo / "configs" / "tasks"), "--limit", "4",
         "--batch_size", "4", "--output_path", str(tmp_path / "out")],
        cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("results*.json")]
    assert results, f"no lm-eval results file under {tmp_path / 'out'}"
    acc = results[0]["results"]["wiki_cloze_offline"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert results[0]["config"]["model"] == "dlm"
