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


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, as its vocab.json and merges.txt spell tokens:
    printable Latin-1 bytes are themselves, the others (space, newline, controls) are shifted
    to chr(256 + n) in byte order, so a space is 'Ġ' and a newline 'Ċ'."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {b: chr(b) for b in keep}
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + len(out) - len(keep))
    return out


def gpt2_vocab_and_merges(enc) -> tuple[dict[str, int], list[str]]:
    """Hugging Face's GPT-2 tokenizer files (vocab.json's dict, merges.txt's lines) from tiktoken's
    gpt2 Encoding. tiktoken keeps only each token's rank; the merge that made a token of rank r
    is found by running BPE on its bytes with the merges ranked below r, which stops at the two
    parts that r joins (this gives OpenAI's vocab.bpe line for line)."""
    b2u = byte_to_unicode()
    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i not in (enc.eot_token,)}
    vocab = {"".join(b2u[b] for b in token): i for token, i in ranks.items()}
    vocab["<|endoftext|>"] = enc.eot_token
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = min(((ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))))
            if best[0] >= rank:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {rank} ({token!r}) is not one merge of two tokens")
        merges.append(" ".join("".join(b2u[b] for b in p) for p in parts))
    return vocab, merges


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
