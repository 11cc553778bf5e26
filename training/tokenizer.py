"""Train the built-in model's SentencePiece vocabulary on its caption language.

umT5's conventions: pad 0, eos 1, unk 2, no bos, '</s>' appended. A BPE model (on a language of
57 words a unigram model stops at about 100 pieces and splits common words); every caption word is
one piece. Case is folded (nmt_nfkc_cf), and every letter, digit and common punctuation mark is a
piece, so any ASCII prompt tokenizes without <unk>. Saved as a transformers tokenizer folder (tokenizer.json,
spiece.model, configs), which is what the official layout's google/umt5-xxl/ holds.

    python -m training.tokenizer OUT_DIR
"""

from __future__ import annotations

import argparse
import io
import random
import string
from pathlib import Path

from wanfit.builtin import BUILTIN_TEXT
from wanfit.builtin.language import all_scenes, paraphrase

VOCAB_SIZE = BUILTIN_TEXT["vocab_size"]
CORPUS_CAPTIONS = 40000


def caption_corpus(seed: int = 0, count: int = CORPUS_CAPTIONS) -> list[str]:
    rng = random.Random(f"{seed}/tokenizer")
    scenes = all_scenes()
    return [paraphrase(rng.choice(scenes), rng) for _ in range(count)]


def train_tokenizer(out_dir: str | Path, seed: int = 0, vocab_size: int = VOCAB_SIZE) -> Path:
    import sentencepiece as spm
    from transformers import T5Tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(caption_corpus(seed)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        normalization_rule_name="nmt_nfkc_cf",
        character_coverage=1.0,
        # Every single character a prompt may hold, beyond the captions' own.
        required_chars=string.ascii_lowercase + string.digits + ".,!?'-",
        byte_fallback=False,
        num_threads=1,
        minloglevel=2,
    )
    spiece = out_dir / "spiece.model"
    spiece.write_bytes(model.getvalue())
    # Converted from spiece.model by transformers' own SentencePiece converter.
    tokenizer = T5Tokenizer.from_pretrained(str(out_dir), extra_ids=0, legacy=False, model_max_length=512)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(train_tokenizer(args.out, args.seed))


if __name__ == "__main__":
    main()
