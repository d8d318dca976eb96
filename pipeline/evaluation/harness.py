"""lm-eval support for masked-diffusion LMs: the `dlm` model type (LLaDA/Dream-style, and minilm-dlm).

In Python, wrap a model already in memory (no reload):

    lm = DiffusionLM(model=model, tokenizer=tokenizer, mask_token_id=103, mc_num=64, batch_size=32)
    lm_eval.simple_evaluate(model=lm, tasks=[...])           # or pipeline.evaluation.scoring.evaluate_tasks

From the shell, run lm-eval's own CLI through this module (it registers `dlm` first; lm-eval 0.4.13 has
no plugin entry points, so a bare `lm_eval --model dlm` cannot see a model type defined outside its
package).  From any folder (the package's offline task YAMLs, configs/tasks, are always on the include path):

    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    python -m pipeline.evaluation.harness --model dlm --model_args pretrained=minilm-dlm,mc_num=8 \\
        --tasks wiki_cloze_offline --include_path configs/tasks --limit 20 --batch_size 8

Every argument is lm-eval's (`python -m pipeline.evaluation.harness run --help`).  `pretrained` is anything
`pipeline.model.loading.load_dlm` takes (embedded name, local folder, hub id); the other model_args are this
class's keyword arguments.  `--batch_size` is the number of Monte Carlo draws per forward pass ('auto':
all mc_num draws of a request in one pass).

Model protocol: `loading.dlm_forward(model, ids).logits` (= `model(input_ids=ids)`, but for DiffusionGemma, whose
decoder denoises ids as its canvas) with ids [B, L]; no padding is ever needed (every forward
holds draws of one request, or one prompt), so no attention mask is passed.  Sequences are
`special prefix + context + continuation`, where the special prefix is what the tokenizer itself puts in
front of text ([CLS] for BERT-type, <BOS> for LLaDA, nothing for Dream), found by tokenizing a probe with
and without special tokens; trailing specials ([SEP], EOS) are not appended, since the text goes on after
the continuation.  `add_bos=True/False` overrides the probe.  The special prefix is never masked.

Requests:
  loglikelihood          LLaDA's Monte Carlo ELBO (pipeline.evaluation.likelihood.mc_loglikelihood): mc_num draws,
                         stratified count of masked continuation tokens, CE / mask rate.  The noise is
                         seeded by (seed, prompt tokens, continuation length): the same request always gets
                         the same estimate, on any rank or batch, and the choices of one multiple-choice
                         question with equal token length share their masks (paired comparison).
                         Each distinct noised sequence of a request list is run once (draws and
                         questions repeat them; likelihood.TargetLogits), the LM head only at the target.
                         is_greedy: `greedy_check` ('single': one fully-masked forward, argmax ==
                         continuation at every position; 'iterative': LLaDA's one-token-per-step decode;
                         'none').  cfg > 0: unsupervised classifier-free guidance, prompt masked
                         (special prefix kept) in the unconditional pass.  Inputs longer than the model's
                         max length lose context tokens from the left.
  loglikelihood_rolling  the same estimator over disjoint chunks of the text, each conditioned on as much
                         preceding text as fits.
  generate_until         pipeline.evaluation.sampler.diffusion_generate (block-wise semi-autoregressive): gen_length
                         (a request's max_gen_toks wins; steps then scale with it), block_length, steps,
                         remasking, temperature (a request's temperature wins; do_sample=False is
                         greedy); output cut at the first EOS/[SEP]/pad token and at the first stop string.

DDP: with torch.distributed initialised, rank/world_size come from it and lm-eval's evaluator shards the
documents across ranks; all_gather / gather_object / barrier use torch.distributed.  Under torchrun
(WORLD_SIZE > 1 in the environment) the constructor initialises the process group itself (NCCL with
CUDA, else gloo) and puts the model on cuda:LOCAL_RANK:

    torchrun --nproc_per_node 8 -m pipeline.evaluation.harness --model dlm --model_args pretrained=GSAI-ML/LLaDA-8B-Base,mc_num=128,cfg=0.5,dtype=bfloat16 \\
        --tasks arc_challenge --batch_size 32 --device cuda

The offline task YAMLs import `pipeline.evaluation.offline_tasks`: run from the repository root, or `pip install -e .`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import lm_eval.models  # noqa: F401  fills lm-eval's lazy model registry before `dlm` joins it
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from pipeline.maths.diffusion import config_max_length, hashed_seed
from pipeline.evaluation.likelihood import TargetLogits, greedy_match, mc_loglikelihood
from pipeline.evaluation.sampler import diffusion_generate
from pipeline.run.strategy import dist_ready

log = logging.getLogger(__name__)
FALLBACK_MAX_LENGTH = 2048


def request_seed(seed: int, *parts) -> int:
    """A 63-bit seed from the global seed and a request's identity (hash, not order: DDP-safe)."""
    return hashed_seed(repr((seed, *parts)))


def special_prefix_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before text ([CLS], <BOS>, or none)."""
    probe = "hello world"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i])
    log.warning("could not locate the text inside the tokenizer's special-token framing; using no prefix")
    return []


def model_max_length(model, tokenizer, explicit: int | None = None) -> int:
    if explicit:
        return int(explicit)
    from_config = config_max_length(getattr(model, "config", None))
    if from_config is not None:
        return from_config
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        return tok_max
    return FALLBACK_MAX_LENGTH


def rolling_chunks(ids: list[int], budget: int):
    """Disjoint chunks of `budget` tokens, each with as much preceding text as fits as its context."""
    for start in range(0, len(ids), budget):
        target = ids[start : start + budget]
        room = budget - len(target)
        yield ids[max(0, start - room) : start], target


def _parse_batch_size(batch_size) -> int | None:
    """Draws per forward; None means all mc_num draws of a request at once ('auto')."""
    if batch_size is None or str(batch_size).startswith("auto"):
        return None
    return max(1, int(batch_size))


def _usable_device(device: str | None) -> str | None:
    """The requested device, or None (leave the model where it is) when it does not exist here.

    lm-eval's CLI asks for 'cuda' by default; on a CPU-only machine that would fail, so we warn and stay.
    """
    if not device:
        return None
    kind = str(device).split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        log.warning("device %r requested but CUDA is not available; staying on the model's device", device)
        return None
    if str(device) == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per process under torchrun
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        log.warning("device %r requested but MPS is not available; staying on the model's device", device)
        return None
    return str(device)


def init_distributed_from_env() -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1), unless one is already initialised."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.distributed.is_available():
        return
    if torch.distributed.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


@register_model("dlm")
class DiffusionLM(LM):
    """lm-eval LM for masked-diffusion language models (see the module docstring)."""

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model=None,
        tokenizer=None,
        mask_token_id: int | None = None,
        mc_num: int = 128,
        batch_size: int | str | None = 32,
        cfg: float = 0.0,
        greedy_check: str = "single",
        max_length: int | None = None,
        gen_length: int = 128,
        block_length: int = 32,
        steps: int = 128,
        temperature: float = 0.0,
        remasking: str = "low_confidence",
        seed: int = 0,
        add_bos: bool | None = None,
        device: str | None = None,
        dtype: str | None = None,
        trust_remote_code: bool = True,
        show_progress: bool = True,
    ):
        super().__init__()
        from pipeline.model.loading import load_dlm, resolve_mask_token_id

        init_distributed_from_env()

        if model is None:
            if pretrained is None:
                raise ValueError("DiffusionLM needs pretrained=<name or path> or model=/tokenizer= objects")
            model, loaded_tokenizer = load_dlm(str(pretrained), trust_remote_code=trust_remote_code,
                                               torch_dtype=dtype)
            tokenizer = tokenizer or loaded_tokenizer
        if tokenizer is None:
            raise ValueError("DiffusionLM(model=...) needs its tokenizer too")
        device = _usable_device(device)
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.mask_token_id = resolve_mask_token_id(tokenizer, getattr(model, "config", None), mask_token_id)
        self.mc_num = int(mc_num)
        self.batch_size = _parse_batch_size(batch_size)
        self.cfg = float(cfg)
        self.greedy_check = str(greedy_check)
        self.max_length = model_max_length(model, tokenizer, max_length)
        self.gen_length, self.block_length, self.steps = int(gen_length), int(block_length), int(steps)
        self.temperature, self.remasking = float(temperature), str(remasking)
        self.seed = int(seed)
        self.show_progress = show_progress if show_progress == "rich" else bool(show_progress)
        self.task_label: str | None = None
        if add_bos is None:
            self.prefix_ids = special_prefix_ids(tokenizer)
        else:
            bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
            self.prefix_ids = [bos] if add_bos and bos is not None else []
        stops = (tokenizer.eos_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
        self.stop_token_ids = {t for t in stops if t is not None and t != self.mask_token_id}

    # ------------------------------------------------------------------ lm-eval's distributed hooks
    @property
    def device(self):
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    @property
    def rank(self) -> int:
        return torch.distributed.get_rank() if dist_ready() else 0

    @property
    def world_size(self) -> int:
        return torch.distributed.get_world_size() if dist_ready() else 1

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if not dist_ready():
            return tensor.reshape(-1) if tensor.dim() == 0 else tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if not dist_ready():
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if dist_ready():
            torch.distributed.barrier()

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def get_model_info(self) -> dict:
        return {
            "dlm_mc_num": self.mc_num, "dlm_cfg": self.cfg, "dlm_greedy_check": self.greedy_check,
            "dlm_mask_token_id": self.mask_token_id, "dlm_max_length": self.max_length,
            "dlm_gen_length": self.gen_length, "dlm_block_length": self.block_length,
            "dlm_steps": self.steps, "dlm_remasking": self.remasking, "dlm_seed": self.seed,
        }

    # ------------------------------------------------------------------ tokenization
    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Tokenize context+continuation jointly and split (robust to merges across the boundary)."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self._encode(context + continuation)
        context_ids = self._encode(context)
        return context_ids, whole[len(context_ids) :]

    def _fit(self, context_ids: list[int], target_ids: list[int], reserve: int = 0):
        """prefix + context cut from the left so that prompt + target (+ reserve) fits max_length."""
        budget = self.max_length - len(self.prefix_ids) - reserve
        if len(target_ids) > budget:
            log.warning("continuation of %d tokens exceeds max length; keeping its last %d", len(target_ids), budget)
            target_ids = target_ids[-budget:]
        room = budget - len(target_ids)
        context_ids = context_ids[max(0, len(context_ids) - room) :]
        return self.prefix_ids + context_ids, target_ids

    def _keep_mask(self, prompt_len: int) -> torch.Tensor:
        keep = torch.zeros(prompt_len, dtype=torch.bool)
        keep[: len(self.prefix_ids)] = True
        return keep

    # ------------------------------------------------------------------ scoring
    def target_logits(self) -> TargetLogits:
        """A cache of forwards for one pass over requests (the model does not change during it)."""
        return TargetLogits(self.model, self.mask_token_id, self.cfg, self._keep_mask(len(self.prefix_ids)))

    def score(self, prompt: list[int], target: list[int], cache: TargetLogits | None = None) -> tuple[float, bool]:
        """(MC log-likelihood, is_greedy) of target token ids after prompt token ids (prefix included)."""
        prompt_t = torch.tensor(prompt, dtype=torch.long)
        target_t = torch.tensor(target, dtype=torch.long)
        generator = torch.Generator().manual_seed(request_seed(self.seed, "ll", tuple(prompt), len(target)))
        keep = self._keep_mask(len(prompt))
        cache = cache or self.target_logits()
        ll = mc_loglikelihood(
            self.model, prompt_t, target_t, self.mask_token_id, mc_num=self.mc_num,
            batch_size=self.batch_size or self.mc_num, cfg=self.cfg, generator=generator, keep_in_guidance=keep,
            cache=cache,
        )
        greedy = greedy_match(self.model, prompt_t, target_t, self.mask_token_id, mode=self.greedy_check,
                              cfg=self.cfg, keep_in_guidance=keep, cache=cache)
        return ll, greedy

    def _progress(self, requests, desc: str):
        if self.show_progress == "rich":
            from pipeline.run.console import track

            return track(requests, f"{self.task_label or desc}", total=len(requests), unit="requests")
        return tqdm(requests, desc=desc, disable=not self.show_progress or self.rank != 0)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results, cache = [], self.target_logits()
        for request in self._progress(requests, "dlm loglikelihood"):
            context, continuation = request.args
            prompt, target = self._fit(*self._encode_pair(context, continuation))
            result = self.score(prompt, target, cache)
            results.append(result)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        budget = self.max_length - len(self.prefix_ids)
        results, cache = [], self.target_logits()
        for request in self._progress(requests, "dlm loglikelihood_rolling"):
            (text,) = request.args
            total = 0.0
            for context, target in rolling_chunks(self._encode(text), budget):
                prompt = self.prefix_ids + context
                generator = torch.Generator().manual_seed(request_seed(self.seed, "roll", tuple(prompt), tuple(target)))
                total += mc_loglikelihood(
                    self.model, torch.tensor(prompt, dtype=torch.long), torch.tensor(target, dtype=torch.long),
                    self.mask_token_id, mc_num=self.mc_num, batch_size=self.batch_size or self.mc_num,
                    cfg=self.cfg, generator=generator, keep_in_guidance=self._keep_mask(len(prompt)), cache=cache,
                )
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    # ------------------------------------------------------------------ generation
    def generate(self, context: str, gen_kwargs: dict | None = None) -> str:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        gen_length = int(kwargs.pop("max_gen_toks", self.gen_length))
        steps = max(1, round(self.steps * gen_length / self.gen_length))  # keep steps per token
        temperature = kwargs.get("temperature")
        temperature = self.temperature if temperature is None else float(temperature)
        if kwargs.get("do_sample") is False:
            temperature = 0.0
        prompt, _ = self._fit(self._encode(context), [], reserve=gen_length)
        generator = torch.Generator().manual_seed(request_seed(self.seed, "gen", tuple(prompt)))
        out = diffusion_generate(
            self.model, torch.tensor(prompt, dtype=torch.long, device=self.device), self.mask_token_id,
            gen_length=gen_length, block_length=min(self.block_length, gen_length),
            steps=steps, temperature=temperature, remasking=self.remasking, generator=generator,
            cfg=self.cfg, keep_prompt_in_guidance=self._keep_mask(len(prompt)),
        )
        generated = out[0, len(prompt) :].tolist()
        for i, token in enumerate(generated):
            if token in self.stop_token_ids:
                generated = generated[:i]
                break
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text

    def generate_until(self, requests) -> list[str]:
        results = []
        for request in self._progress(requests, "dlm generate_until"):
            context, gen_kwargs = request.args
            text = self.generate(context, gen_kwargs)
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results


EVAL_HELP = """sinkprune-eval: lm-eval's command line with the `dlm` model type (masked-diffusion LMs) registered.

  --model dlm --model_args pretrained=NAME[,mc_num=128,cfg=0.0,batch_size=32,dtype=bfloat16,...]
      NAME: an embedded model (minilm-dlm, tiny-llada), a saved sinkprune run (RUN/pruned/model), a folder
      or a hub id (GSAI-ML/LLaDA-8B-Base).  mc_num: Monte Carlo draws per loglikelihood request.
  offline tasks (no network; {tasks} is always included):
      {names}
  example:
      HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 sinkprune-eval --model dlm --model_args pretrained=minilm-dlm,mc_num=8 \\
          --tasks wiki_cloze_offline --include_path {tasks} --limit 20 --batch_size 8
  --device defaults to cpu when this torch sees no CUDA device.

lm-eval's own options follow.
"""


def quiet_git_hash() -> None:
    """lm-eval records the working directory's git commit by running git with its stderr on the console, which
    prints "fatal: not a git repository" anywhere outside a checkout: the same commit, asked quietly."""
    import subprocess

    import lm_eval.evaluator

    def git_hash() -> str | None:
        try:
            done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return (done.stdout.strip() or None) if done.returncode == 0 else None

    lm_eval.evaluator.get_git_commit_hash = git_hash


def with_package_tasks(argv: list[str], tasks: Path) -> list[str]:
    """The package's offline tasks (configs/tasks) from any working directory, as `fit` finds them: added when no
    --include_path is given, and standing in for a relative configs/tasks that is not there (run outside the repo
    root).  Another folder of the user's own tasks is left as given (lm-eval takes one)."""
    given = next((i for i, a in enumerate(argv) if a == "--include_path" or a.startswith("--include_path=")), None)
    if given is None:
        return [*argv, "--include_path", str(tasks)]
    flag, eq, value = argv[given].partition("=")
    value = value if eq else (argv[given + 1] if given + 1 < len(argv) else "")
    path = Path(value).expanduser()
    if path.exists() or path.parts[:2] != ("configs", "tasks"):
        return argv
    packaged = tasks.joinpath(*path.parts[2:])
    return [*argv[:given], "--include_path", str(packaged), *argv[given + (1 if eq else 2):]]


def main() -> None:
    """lm-eval's CLI with the `dlm` model type registered."""
    import sys

    argv = sys.argv[1:]
    tasks = Path(__file__).resolve().parents[2] / "configs" / "tasks"
    if any(a in ("-h", "--help") for a in argv):
        names = ", ".join(sorted(p.stem for p in tasks.glob("*.yaml")))
        print(EVAL_HELP.format(tasks=tasks, names=names))
    elif not any(a == "--device" or a.startswith("--device=") for a in argv) and not torch.cuda.is_available():
        sys.argv.extend(["--device", "cpu"])  # lm-eval's default is cuda; on a CPU-only machine that is not a choice
    if argv and not any(a in ("-h", "--help") for a in argv):
        sys.argv[1:] = with_package_tasks(sys.argv[1:], tasks)
    from lm_eval.__main__ import cli_evaluate

    quiet_git_hash()
    cli_evaluate()


if __name__ == "__main__":
    main()
