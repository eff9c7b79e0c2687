"""Import and export: Hugging Face GPT-2 folders, nanoGPT ckpt.pt, consolidated files, init_from."""

import pytest
import torch

from conftest import run_module, tiny_args
from scaling.checkpoint import load_model
from scaling.convert import ours_to_nanogpt, read_weights

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
    sd, gcfg = read_weights(tmp_path / "ours.pt")
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
    back, gcfg = read_weights(tmp_path / "ckpt.pt")
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
