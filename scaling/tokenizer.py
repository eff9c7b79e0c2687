"""Tokenizers: GPT-2 BPE (tiktoken), bytes, and characters. A dataset's meta.json names its own.

GPT-2 BPE is downloaded by tiktoken on first use. Offline, point TIKTOKEN_CACHE_DIR at a folder
made by `python -m scaling.tokenizer --cache DIR --from BPE_DIR` (BPE_DIR holding OpenAI's
vocab.bpe and encoder.json).
"""

import argparse
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; 256 marks the end of a document."""
    name = "byte"
    vocab_size = 257
    eot = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_np(self, text: str):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class CharTokenizer:
    """One token per character of a fixed alphabet (nanoGPT's shakespeare_char)."""
    name = "char"
    eot = None

    def __init__(self, chars: str):
        self.chars = chars
        self.vocab_size = len(chars)
        self.index = {c: i for i, c in enumerate(chars)}

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this dataset's alphabet") from None

    def encode_np(self, text: str):
        return np.asarray(self.encode(text), dtype=np.uint32)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


class GPT2Tokenizer:
    name = "gpt2"
    vocab_size = 50257
    eot = 50256

    def __init__(self):
        import tiktoken
        try:
            self.enc = tiktoken.get_encoding("gpt2")
        except OSError as e:  # requests' errors are OSErrors: no network and no cached files
            raise ConnectionError(f"no network: tiktoken cannot fetch GPT-2's BPE files ({type(e).__name__}); "
                                  "offline, run python -m scaling.tokenizer --cache DIR --from BPE_DIR and "
                                  "export TIKTOKEN_CACHE_DIR=DIR") from None

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_np(self, text: str):
        """uint32 ids without building a Python list (10% faster than encode_ordinary). No special
        tokens: "<|endoftext|>" inside a document is text, as with encode_ordinary."""
        return self.enc.encode_to_numpy(text, disallowed_special=())

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))


TOKENIZERS = ("byte", "char", "gpt2")  # the names get_tokenizer knows


def get_tokenizer(name: str, meta: dict | None = None):
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        return CharTokenizer((meta or {})["chars"])
    raise ValueError(f"unknown tokenizer {name!r} ({', '.join(TOKENIZERS)})")


# tiktoken caches each file under the sha1 of its URL.
GPT2_FILES = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


def fill_gpt2_cache(bpe_dir: str | Path, cache_dir: str | Path) -> Path:
    """Copy vocab.bpe and encoder.json into a tiktoken cache folder under the names tiktoken
    looks for, so that get_encoding('gpt2') works with TIKTOKEN_CACHE_DIR=cache_dir offline."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for fname, url in GPT2_FILES.items():
        src = Path(bpe_dir) / fname
        if not src.is_file():
            raise FileNotFoundError(f"{src} not found (need vocab.bpe and encoder.json)")
        shutil.copyfile(src, cache_dir / hashlib.sha1(url.encode()).hexdigest())
    return cache_dir


def main():
    ap = argparse.ArgumentParser(description="Fill a tiktoken cache for offline GPT-2 BPE.")
    ap.add_argument("--cache", default=os.environ.get("TIKTOKEN_CACHE_DIR"), required=False)
    ap.add_argument("--from", dest="src", required=True, help="folder with vocab.bpe and encoder.json")
    a = ap.parse_args()
    if not a.cache:
        ap.error("--cache (or TIKTOKEN_CACHE_DIR) is required")
    print(f"export TIKTOKEN_CACHE_DIR={fill_gpt2_cache(a.src, a.cache).resolve()}")


if __name__ == "__main__":
    main()
