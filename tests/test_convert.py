"""Import and export: Hugging Face GPT-2 folders, nanoGPT ckpt.pt, consolidated files, init_from."""

import pytest
import torch

from conftest import run_module, tiny_args
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
    first_val = [line for line in p.stdout.splitlines() if line.startswith("step 0 | val_loss")][0]
    scratch = run_module("scaling.train", *tiny_args(data_root, tmp_path / "sc", "--train.max_steps=2"), check=True)
    scratch_val = [line for line in scratch.stdout.splitlines() if line.startswith("step 0 | val_loss")][0]
    assert float(first_val.split()[4]) < float(scratch_val.split()[4]) - 0.3  # starts where the run ended


def test_init_from_with_another_shape_is_a_one_line_error(trained, data_root, tmp_path):
    p = run_module("scaling.train", *tiny_args(data_root, tmp_path, f"--model.init_from={trained}",
                                               "--model.n_layer=3"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "n_layer=2" in p.stderr, p.stderr


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
    with pytest.raises(OSError, match="No space left"):
        write_weights(sd, cfg, tmp_path / "ours.pt", "pt")
    assert (tmp_path / "ours.pt").read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ours.pt"]


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
    monkeypatch.setattr(scaling.weights, "load_model", lambda path, device: (None, CharTokenizer("abc"), None))
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
