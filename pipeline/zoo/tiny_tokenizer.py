"""The byte-level BPE tokenizer shared by `tiny-llada` and `tiny-ar`, trained on the embedded Wikipedia.

Special tokens carry LLaDA's names: <|startoftext|> (BOS, prepended by the tokenizer like LLaDA's),
<|endoftext|> (EOS, separates articles), <|mdm_mask|> (the diffusion mask), <|pad|>.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

BOS, EOS, MASK, PAD = "<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|pad|>"
VOCAB_SIZE = 4096
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def train_tokenizer(vocab_size: int = VOCAB_SIZE):
    """Train the BPE on wiki_split('train') and wrap it as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from pipeline.model.corpus import wiki_split

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, MASK, PAD],  # ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(wiki_split("train"), trainer=trainer)
    bos_id = bpe.token_to_id(BOS)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, mask_token=MASK, pad_token=PAD, model_max_length=512,
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids: LLaDA takes none
    )


def ensure_tokenizer(folder: Path) -> None:
    """Write the tokenizer files into `folder` unless they are there (atomic: built aside, then moved)."""
    folder = Path(folder)
    if all((folder / name).is_file() for name in TOKENIZER_FILES):
        return
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        train_tokenizer().save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            shutil.move(str(Path(tmp) / name), str(folder / name))


def copy_tokenizer(src: Path, dst: Path) -> None:
    Path(dst).mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(Path(src) / name, Path(dst) / name)
