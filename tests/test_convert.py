"""Import and export: Hugging Face GPT-2 folders, nanoGPT ckpt.pt, consolidated files, init_from."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import GPT2_BPE, ROOT, prepare_offline, read_metrics, run_module, run_torchrun, tiny_args, tiny_hf_gpt2
from scaling.weights import load_model, ours_to_nanogpt, read_weights

transformers = pytest.importorskip("transformers")


def logits(model, vocab, T=16):
    idx = torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(idx)
    return getattr(out, "logits", out)


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """A tiny run (byte vocabulary, 2 layers) trained as FSDP-free single process: its checkpoint."""
    run_dir = tmp_path_factory.mktemp("run")
    run_module("scaling.train", *tiny_args(data_root, run_dir), check=True)
    return run_dir


def test_export_to_huggingface_loads_in_gpt2lmheadmodel_with_identical_logits(trained, tmp_path):
    run_module("scaling.convert", trained, tmp_path / "hf", "--to", "hf", check=True)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ours, _, _ = load_model(trained)
    assert (logits(hf, 257) - logits(ours, 257)).abs().max() <= 1e-5


def test_huggingface_folder_imports_with_identical_logits(tmp_path):
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=300)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    run_module("scaling.convert", tmp_path / "hf", tmp_path / "ours.pt", check=True)
    sd, gcfg, _ = read_weights(tmp_path / "ours.pt")
    from scaling.model import GPT
    model = GPT(gcfg).eval()
    model.load_state_dict(sd)
    assert (logits(hf, 300) - logits(model, 300)).abs().max() <= 1e-5


def test_nanogpt_checkpoint_with_compile_prefixes_imports(trained, tmp_path):
    ours, _, _ = load_model(trained)
    sd = {"_orig_mod." + k: v for k, v in ours_to_nanogpt(ours.state_dict(), ours.cfg.n_layer).items()}
    sd["_orig_mod.transformer.h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()  # nanoGPT's mask buffer
    c = ours.cfg
    torch.save({"model": sd, "model_args": dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                                                block_size=c.block_size, bias=True, vocab_size=c.vocab_size,
                                                dropout=0.0), "iter_num": 5000}, tmp_path / "ckpt.pt")
    back, gcfg, _ = read_weights(tmp_path / "ckpt.pt")
    assert gcfg == ours.cfg
    for k, v in ours.state_dict().items():
        assert torch.equal(back[k], v), k


def test_recipe_starts_from_imported_weights(trained, data_root, tmp_path):
    run_module("scaling.convert", trained, tmp_path / "hf", "--to", "hf", check=True)
    p = run_module("scaling.train", *tiny_args(data_root, tmp_path / "ft", f"--model.init_from={tmp_path / 'hf'}",
                                               "--train.max_steps=2"), check=True)
    assert "initialised from" in p.stdout
    run_module("scaling.train", *tiny_args(data_root, tmp_path / "sc", "--train.max_steps=2"), check=True)
    first_val, scratch_val = ([r["val_loss"] for r in read_metrics(tmp_path / run) if "val_loss" in r][0]
                              for run in ("ft", "sc"))  # each run's step-0 evaluation
    assert first_val < scratch_val - 0.3  # starts where the run ended


def test_init_from_with_another_shape_is_a_one_line_error(trained, data_root, tmp_path):
    p = run_module("scaling.train", *tiny_args(data_root, tmp_path, f"--model.init_from={trained}",
                                               "--model.n_layer=3"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "n_layer=2" in p.stderr, p.stderr



# init_from under several ranks: rank 0 alone reads the file, the others get their shards by broadcast.

PARITY = ["--train.global_batch_size=8", "--train.max_steps=4", "--logging.every=1", "--train.eval_every=4",
          "--parallel.timeout_s=60", "--optim.warmup_steps=2", "--train.dtype=fp32"]


def test_init_from_under_fsdp2_trains_as_one_process_does(trained, data_root, tmp_path):
    run_module("scaling.train", *tiny_args(data_root, tmp_path / "one", f"--model.init_from={trained}", *PARITY,
                                           "--train.micro_batch_size=8"), check=True)
    run_torchrun(2, "scaling.train", *tiny_args(data_root, tmp_path / "two", f"--model.init_from={trained}", *PARITY,
                                                "--train.micro_batch_size=4", "--parallel.dp_shard=2"))
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for key in ("loss", "val_loss"):
        a, b = [r[key] for r in two if key in r], [r[key] for r in one if key in r]
        assert len(a) == len(b) > 0 and a == pytest.approx(b, rel=1e-5, abs=1e-5), key


OPENS_PROBE = """
import json, os, runpy, sys
watched, out = sys.argv[1], sys.argv[2]
opened = []
sys.addaudithook(lambda event, args: event == "open" and str(args[0]) == watched and opened.append(event))
sys.argv = ["scaling.train", *sys.argv[3:]]
try:
    runpy.run_module("scaling.train", run_name="__main__")
finally:  # files, not stdout: ranks' prints interleave
    with open(os.path.join(out, "rank" + os.environ["RANK"]), "w") as f:
        json.dump(len(opened), f)
"""


def test_init_from_is_read_by_rank_0_alone(trained, data_root, tmp_path):
    run_module("scaling.convert", trained, tmp_path / "ours.pt", check=True)
    (tmp_path / "probe.py").write_text(OPENS_PROBE)
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(tmp_path / "probe.py"), str(tmp_path / "ours.pt"), str(tmp_path),
                        *map(str, tiny_args(data_root, tmp_path / "run", f"--model.init_from={tmp_path / 'ours.pt'}",
                                            "--train.max_steps=1", "--parallel.dp_shard=2", "--parallel.timeout_s=60"))],
                       cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "initialised from" in p.stdout
    assert json.loads((tmp_path / "rank0").read_text()) >= 1
    assert json.loads((tmp_path / "rank1").read_text()) == 0


def test_init_from_with_another_shape_under_two_ranks_is_one_line_exit_2(trained, data_root, tmp_path):
    p = run_torchrun(2, "scaling.train", *tiny_args(data_root, tmp_path, f"--model.init_from={trained}",
                                                    "--model.n_layer=3", "--parallel.dp_shard=2",
                                                    "--parallel.timeout_s=60"), check=False)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.init_from" in errors[0] and "n_layer=2" in errors[0], p.stderr[-3000:]
    assert p.returncode != 0 and "failed (exitcode: 2)" in p.stderr, p.stderr[-3000:]  # torchrun's report of a rank

# Anything that is not a checkpoint is one line naming the path and what was expected, exit 2.

def not_weights(tmp_path, kind):
    p = tmp_path / kind
    if kind == "text.pt":
        p.write_text("hello, world\n")
    elif kind == "empty.pt":
        p.touch()
    elif kind == "folder":
        p.mkdir()
    elif kind == "list.pt":
        torch.save([1, 2, 3], p)
    elif kind == "partial.pt":  # ours, but a tensor short
        torch.save({"model": {"wte.weight": torch.zeros(10, 8)},
                    "gpt_config": dict(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=10)}, p)
    return p


@pytest.mark.parametrize("kind, why", [
    ("missing", "not found"),
    ("text.pt", "cannot read weights (not a PyTorch file of tensors)"),
    ("empty.pt", "cannot read weights (not a PyTorch file of tensors)"),
    ("folder", "cannot read weights (no complete checkpoint in"),
    ("list.pt", "cannot read weights (a list without 'gpt_config' or 'model_args')"),
    ("partial.pt", "cannot read weights (no tensor wpe.weight)"),
])
def test_convert_of_what_is_not_a_checkpoint_exits_2_with_one_line_naming_it(kind, why, tmp_path, capsys):
    from scaling.convert import main
    src = not_weights(tmp_path, kind)
    with pytest.raises(SystemExit) as e:
        main([str(src), str(tmp_path / "out.pt")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {src}: {why}"), err
    assert "expected our checkpoint or run folder or .pt, a Hugging Face GPT-2 folder or a nanoGPT ckpt.pt" in err
    assert not (tmp_path / "out.pt").exists()


def test_init_from_an_empty_file_exits_2_with_one_line_naming_it(data_root, tmp_path):
    (tmp_path / "empty.pt").touch()
    p = run_module("scaling.train", *tiny_args(data_root, tmp_path / "run", f"--model.init_from={tmp_path}/empty.pt"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"error: model.init_from: {tmp_path / 'empty.pt'}: cannot read weights"), p.stderr


def test_export_to_huggingface_refuses_a_model_without_biases(tmp_path):
    from scaling.weights import write_weights
    from scaling.model import GPT, GPTConfig
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=10, bias=False)
    with pytest.raises(ValueError, match="--to hf: Hugging Face GPT-2 always has biases"):
        write_weights(GPT(cfg).state_dict(), cfg, tmp_path / "hf", "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_a_failed_export_leaves_the_file_already_at_dst(trained, tmp_path, monkeypatch):
    from scaling.weights import write_weights
    run_module("scaling.convert", trained, tmp_path / "ours.pt", check=True)
    before = (tmp_path / "ours.pt").read_bytes()
    sd, cfg, _ = read_weights(tmp_path / "ours.pt")

    def disk_full(obj, f):
        open(f, "wb").write(b"half a file")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="no space left on device"):
        write_weights(sd, cfg, tmp_path / "ours.pt", "pt")
    assert (tmp_path / "ours.pt").read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ours.pt"]


# An existing destination: refused without --overwrite; a full disk: one line, nothing partial.

def weights_file(path, n_embd):
    """Our .pt of a 2-layer model, n_embd wide: 128 makes ~1.8 MB, 16 ~40 KB."""
    from scaling.model import GPT, GPTConfig
    from scaling.weights import write_weights
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=n_embd, block_size=64, vocab_size=257))
    write_weights(model.state_dict(), model.cfg, path, "pt")
    return path


def files(folder):
    """Every file under folder, by its path there, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("to, dst, why", [
    ("pt", "out.pt", "already exists; pass --overwrite to replace it"),
    ("hf", "hf", "folder is not empty; pass --overwrite to write the export into it"),
])
def test_convert_refuses_an_existing_destination_without_overwrite(to, dst, why, tmp_path, capsys):
    from scaling.convert import main
    src = weights_file(tmp_path / "src.pt", 16)
    dst = tmp_path / dst
    if to == "hf":
        dst.mkdir()
        (dst / "notes.txt").write_text("someone else's")  # not a file convert writes: still refused
    else:
        dst.write_text("someone else's")
    before = files(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([str(src), str(dst), "--to", to])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {dst}: {why}\n"
    assert files(tmp_path) == before and (to != "hf" or files(dst) == {"notes.txt": b"someone else's"})


@pytest.mark.parametrize("to", ["pt", "hf"])
def test_convert_with_overwrite_replaces_an_existing_destination(to, tmp_path):
    src = weights_file(tmp_path / "src.pt", 16)
    dst = tmp_path / ("hf" if to == "hf" else "out.pt")
    if to == "hf":
        run_module("scaling.convert", weights_file(tmp_path / "old.pt", 32), dst, "--to", "hf", check=True)
        (dst / "notes.txt").write_text("kept")
    else:
        weights_file(dst, 32)
    run_module("scaling.convert", src, dst, "--to", to, "--overwrite", check=True)
    assert read_weights(dst)[1].n_embd == 16
    assert to != "hf" or sorted(files(dst)) == ["README.md", "config.json", "generation_config.json",
                                                "model.safetensors", "notes.txt"]


def can_mount_tmpfs():
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True).returncode == 0


def on_a_small_disk(tmp_path, command):
    """Run the shell line command with tmp_path/disk a fresh 1 MB tmpfs, in a mount namespace of
    its own (gone with the command: nothing to unmount), then copy what the command left on the
    disk to tmp_path/left for the test to look at."""
    disk, left = tmp_path / "disk", tmp_path / "left"
    disk.mkdir()
    left.mkdir()
    script = f"mount -t tmpfs -o size=1m tmpfs {disk} && {command}; rc=$?; cp -a {disk}/. {left}/; exit $rc"
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def convert_cmd(*args):
    return shlex.join([sys.executable, "-m", "scaling.convert", *map(str, args)])


needs_tmpfs = pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare and a tmpfs mount (a mount namespace)")


@needs_tmpfs
@pytest.mark.parametrize("to, dst", [("pt", "out.pt"), ("hf", "hf")])
def test_convert_onto_a_full_disk_is_one_line_and_leaves_nothing_behind(to, dst, tmp_path):
    big = weights_file(tmp_path / "big.pt", 128)  # ~1.8 MB onto 1 MB
    dst = tmp_path / "disk" / dst
    p = on_a_small_disk(tmp_path, convert_cmd(big, dst, "--to", to))
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"error: writing {dst}") and "failed: no space left on device" in p.stderr, p.stderr
    assert p.stderr.endswith(f"{dst} was not created\n"), p.stderr
    assert list((tmp_path / "left").iterdir()) == []  # no partial file, no temporary, no empty folder


@needs_tmpfs
def test_convert_overwrite_onto_a_full_disk_keeps_the_old_destination(tmp_path):
    big, small = weights_file(tmp_path / "big.pt", 128), weights_file(tmp_path / "small.pt", 16)
    dst = tmp_path / "disk" / "out.pt"
    p = on_a_small_disk(tmp_path, f"cp {small} {dst} && " + convert_cmd(big, dst, "--overwrite"))
    assert p.returncode == 1, p.stderr
    assert p.stderr == f"error: writing {dst} failed: no space left on device; {dst} is unchanged\n"
    assert files(tmp_path / "left") == {"out.pt": small.read_bytes()}


# scaling.sample: its arguments are checked before generate() could fail on them (or sample
# silently wrong: a negative temperature favours the least likely tokens).

@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "-5"], "--max-new-tokens: must be >= 0, got -5"),
    (["--temperature", "-1"], "--temperature: must be finite and >= 0 (0 is greedy), got -1.0"),
    (["--top-k", "0"], "--top-k: must be >= 1, got 0"),
    (["--num-samples", "0"], "--num-samples: must be >= 1, got 0"),
], ids=["max-new-tokens", "temperature", "top-k", "num-samples"])
def test_sample_bad_argument_exits_2_with_one_line_naming_it(args, message, trained, capsys):
    from scaling.sample import main
    with pytest.raises(SystemExit) as e:
        main([str(trained), *args])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("kind, why", [("missing", "not found"), ("text.pt", "not a folder")])
def test_sample_of_what_is_not_a_run_or_checkpoint_folder_exits_2_with_one_line_naming_it(kind, why, tmp_path, capsys):
    from scaling.sample import main
    src = not_weights(tmp_path, kind)
    with pytest.raises(SystemExit) as e:
        main([str(src)])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {src}: {why} (expected a run folder or a checkpoint folder)\n"


def test_sample_prompt_outside_the_char_alphabet_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    import scaling.weights
    from scaling.sample import main
    from scaling.tokenizer import CharTokenizer
    monkeypatch.setattr(scaling.weights, "load_checkpoint", lambda path, device: (None, CharTokenizer("abc"), None, None))
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--prompt", "cab!"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: --prompt: character '!' is not in this dataset's alphabet\n"


@pytest.fixture(scope="module")
def padded(data_root, tmp_path_factory):
    """The tiny run with its byte vocabulary (257 ids) padded to 320 rows, as GPT-2 recipes pad
    50257 to 50304."""
    run_dir = tmp_path_factory.mktemp("padded")
    run_module("scaling.train", *tiny_args(data_root, run_dir, "--model.vocab_size=320"), check=True)
    return run_dir


def test_export_of_a_padded_vocabulary_gives_huggingface_the_real_rows_with_identical_logits(padded, tmp_path):
    run_module("scaling.convert", padded, tmp_path / "hf", "--to", "hf", check=True)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ours, tok, _ = load_model(padded)
    assert ours.cfg.vocab_size == 320 and hf.config.vocab_size == tok.vocab_size == 257
    assert (logits(hf, 257) - logits(ours, 257)[..., :257]).abs().max() <= 1e-5


def test_import_into_a_padded_vocabulary_keeps_the_real_logits_and_gives_padding_little_mass():
    from scaling.weights import pad_vocab
    from scaling.model import GPT, gpt_config
    torch.manual_seed(0)
    small = GPT(gpt_config("tiny", vocab_size=257, block_size=16)).eval()
    small.init_weights(0)
    sd, cfg = pad_vocab(small.state_dict(), small.cfg, 320)
    big = GPT(cfg).eval()
    big.load_state_dict(sd)
    a, b = logits(small, 257), logits(big, 257)
    assert torch.equal(a, b[..., :257])
    padding_mass = b.softmax(-1)[..., 257:].sum(-1)
    assert padding_mass.max() < 63 / 257  # at most their share of a uniform distribution


def test_generation_never_samples_a_padded_id():
    from scaling.model import GPT, gpt_config
    model = GPT(gpt_config("tiny", vocab_size=320, block_size=16)).eval()
    model.init_weights(0)
    with torch.no_grad():
        model.wte.weight[257:] = 100 * model.wte.weight[:257].mean(0)  # padded ids would win every draw
    idx = torch.zeros(1, 1, dtype=torch.long)
    greedy = model.generate(idx, 8, temperature=0, vocab_size=257)
    drawn = model.generate(idx, 8, temperature=2.0, generator=torch.Generator().manual_seed(0), vocab_size=257)
    assert greedy.max() < 257 and drawn.max() < 257
    assert model.generate(idx, 8, temperature=0).max() >= 257  # without the limit they would


def test_padded_rows_do_not_count_in_the_flops_behind_mfu():
    from scaling.model import GPT, gpt_config
    with torch.device("meta"):
        real, padded = (GPT(gpt_config("gpt2", vocab_size=v)) for v in (50257, 50304))
    assert padded.flops_per_token(1024, vocab_size=50257) == real.flops_per_token(1024)
    assert padded.flops_per_token(1024) > real.flops_per_token(1024)


# A complete Hugging Face export: GPT-2 BPE models get the tokenizer files, generation_config.json
# and a model card, so that AutoTokenizer and pipeline("text-generation") work; byte and char
# models, which Hugging Face has no tokenizer for, get a note instead of tokenizer files.

GPT2_EXPORT = ["README.md", "config.json", "generation_config.json", "merges.txt", "model.safetensors",
               "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """A tiny run on tiny Shakespeare in GPT-2 BPE tokens, its vocabulary padded to 50304 rows as
    the GPT-2 recipes pad it. Its learning rate is so small that the weights stay near their
    random start: a few steps at the usual rate already continue every prompt with newlines,
    which would not tell two ways of generating apart."""
    root = tmp_path_factory.mktemp("bpe_data")
    prepare_offline("shakespeare", root / "shakespeare", None)
    run_dir = tmp_path_factory.mktemp("bpe_run")
    run_module("scaling.train", *tiny_args(root, run_dir, "--data.dataset=shakespeare", "--model.vocab_size=50304",
                                           "--train.max_steps=4", "--optim.lr=1e-4", "--optim.min_lr=1e-5"),
               check=True)
    return run_dir


@pytest.fixture(scope="module")
def bpe_export(bpe_run, tmp_path_factory):
    """The run exported with --to hf: (its folder, what convert printed)."""
    out = tmp_path_factory.mktemp("bpe_export") / "hf"
    p = run_module("scaling.convert", bpe_run, out, "--to", "hf", check=True)
    return out, p.stdout


def test_huggingface_export_of_a_gpt2_model_holds_its_tokenizer_generation_config_and_card(bpe_export):
    out, printed = bpe_export
    assert sorted(files(out)) == GPT2_EXPORT and "note:" not in printed, printed
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 50257  # padding cut
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["bos_token_id"] == gen["eos_token_id"] == gen["pad_token_id"] == 50256


def test_exported_gpt2_tokenizer_files_are_openais_vocabulary_and_merges(bpe_export):
    # rebuilt from tiktoken's ranks: they must be what GPT-2's own encoder.json and vocab.bpe say
    out, _ = bpe_export
    assert json.loads((out / "vocab.json").read_text()) == json.loads((GPT2_BPE / "encoder.json").read_text())
    assert (out / "merges.txt").read_bytes() == (GPT2_BPE / "vocab.bpe").read_bytes()


@pytest.mark.parametrize("text", ["hello world", "  two  spaces,\n\nnew lines\tand a tab ",
                                  "héllo wörld — 日本語 🤖", "one<|endoftext|>two", "It's 2024: isn't it?",
                                  "spaced , punctuation ."],
                         ids=["plain", "spaces", "unicode", "endoftext", "contractions", "punctuation"])
def test_huggingface_autotokenizer_of_a_gpt2_export_encodes_and_decodes_as_tiktoken(bpe_export, text):
    import tiktoken
    tok = transformers.AutoTokenizer.from_pretrained(bpe_export[0])
    ids = tiktoken.get_encoding("gpt2").encode(text, allowed_special="all")
    assert tok.encode(text) == ids and tok.decode(ids) == text
    assert tok.eos_token_id == 50256 and tok.model_max_length == 64  # the model's block_size


def test_huggingface_pipeline_continues_a_prompt_greedily_as_scaling_sample_does(bpe_run, bpe_export):
    prompt = "Hello"  # one token, another with add_prefix_space (" Hello"): the continuation tells
    ours = run_module("scaling.sample", bpe_run, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", 16,
                      check=True).stdout
    generate = transformers.pipeline("text-generation", model=str(bpe_export[0]))
    theirs = generate(prompt, max_new_tokens=16, do_sample=False)[0]["generated_text"]
    assert theirs + "\n" == ours and len(theirs) > len(prompt), (theirs, ours)


def test_model_card_of_a_gpt2_export_gives_the_runs_steps_tokens_and_final_validation_loss(bpe_run, bpe_export):
    card = (bpe_export[0] / "README.md").read_text()
    last = [r for r in read_metrics(bpe_run) if "val_loss" in r][-1]
    assert last["step"] == 4 and last["tokens"] > 0
    assert "- Steps trained: 4\n" in card and f"- Tokens seen: {last['tokens']:,}\n" in card
    assert f"- Final validation loss: {last['val_loss']:.4f} (at step 4)\n" in card
    assert "- Tokenizer: GPT-2 BPE" in card and f'pipeline("text-generation", model="{bpe_export[0]}")' in card


def test_huggingface_export_of_a_byte_model_prints_why_it_has_no_tokenizer_files(trained, tmp_path):
    p = run_module("scaling.convert", trained, tmp_path / "hf", "--to", "hf", check=True)
    note = ("note: this model uses a byte tokenizer, which Hugging Face has no tokenizer class for; the export has "
            "no tokenizer files (encode text as its UTF-8 bytes: ids 0-255; 256 ends a document)")
    assert p.stdout.splitlines()[1:] == [note], p.stdout
    assert sorted(files(tmp_path / "hf")) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    assert f"- Tokenizer: {note.removeprefix('note: ')}\n" in (tmp_path / "hf" / "README.md").read_text()


def test_huggingface_export_of_a_char_model_prints_why_it_has_no_tokenizer_files_and_gives_the_alphabet(tmp_path):
    from scaling.model import GPT, GPTConfig
    from scaling.weights import write_weights
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=4))
    write_weights(model.state_dict(), model.cfg, tmp_path / "char.pt", "pt", 4,
                  {"name": "char", "vocab_size": 4, "chars": "\n ab"})
    p = run_module("scaling.convert", tmp_path / "char.pt", tmp_path / "hf", "--to", "hf", check=True)
    assert p.stdout.splitlines()[1] == ("note: this model uses a character tokenizer (4 characters), which Hugging "
                                        "Face has no tokenizer class for; the export has no tokenizer files (id i is "
                                        "character i of the alphabet in README.md)"), p.stdout
    assert sorted(files(tmp_path / "hf")) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    assert "chars = '\\n ab'" in (tmp_path / "hf" / "README.md").read_text()


def test_huggingface_export_of_weights_without_a_tokenizer_but_gpt2s_vocabulary_says_it_assumes_gpt2s(tmp_path):
    p = run_module("scaling.convert", tiny_hf_gpt2(tmp_path / "theirs"), tmp_path / "hf", "--to", "hf", check=True)
    note = "note: the source does not record its tokenizer; the export has GPT-2's, whose 50257 ids it has"
    assert p.stdout.splitlines()[1:] == [note], p.stdout
    assert sorted(files(tmp_path / "hf")) == GPT2_EXPORT
    assert note.removeprefix("note: ") in (tmp_path / "hf" / "README.md").read_text()


def test_overwriting_a_gpt2_export_with_a_byte_model_removes_the_old_tokenizer_files(bpe_export, trained, tmp_path):
    dst = tmp_path / "hf"
    shutil.copytree(bpe_export[0], dst)
    (dst / "notes.txt").write_text("kept")
    run_module("scaling.convert", trained, dst, "--to", "hf", "--overwrite", check=True)
    # GPT-2's vocab.json beside a byte model would load as its tokenizer and encode wrongly
    assert sorted(files(dst)) == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                                  "notes.txt"]


def test_gpt2_export_without_the_bpe_files_offline_exits_2_with_one_line_and_writes_nothing(bpe_run, tmp_path):
    # An empty tiktoken cache, and downloads sent through a proxy at port 0 of this machine, which
    # nothing can listen on: refused at once, nothing leaves the machine.
    env = {"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty"), "HTTPS_PROXY": "http://127.0.0.1:0",
           "https_proxy": "http://127.0.0.1:0", "NO_PROXY": "", "no_proxy": ""}
    (tmp_path / "empty").mkdir()
    p = run_module("scaling.convert", bpe_run, tmp_path / "hf", "--to", "hf", env=env)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("error: no network: tiktoken cannot fetch GPT-2's BPE files") and \
        "TIKTOKEN_CACHE_DIR" in p.stderr, p.stderr
    assert not (tmp_path / "hf").exists()


def test_convert_names_the_checkpoint_step_it_read(trained, tmp_path):
    p = run_module("scaling.convert", trained, tmp_path / "out.pt", check=True)
    assert p.stderr == f"loaded {trained / 'checkpoints' / 'step_8'} (step 8)\n", p.stderr


def test_a_pt_file_keeps_the_runs_record_for_the_model_card_of_a_later_export(trained, tmp_path):
    run_module("scaling.convert", trained, tmp_path / "out.pt", check=True)
    run_module("scaling.convert", tmp_path / "out.pt", tmp_path / "hf", "--to", "hf", check=True)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "- Steps trained: 8\n" in card and f"- Checkpoint: `{trained / 'checkpoints' / 'step_8'}`\n" in card, card
