"""The GPT-2 model: parity with Hugging Face, exact sizes, initialisation, generation."""

import math
import re

import pytest
import torch

from conftest import run_module, tiny_args
from scaling.weights import hf_to_ours, ours_to_hf
from scaling.model import GPT, SIZES, gpt_config

GPT2_PARAMS = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168,
               "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


def hf_model(n_layer, n_head, n_embd, n_positions, vocab_size, dropout):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                                  n_positions=n_positions, vocab_size=vocab_size, resid_pdrop=dropout,
                                  embd_pdrop=dropout, attn_pdrop=dropout)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("shape", [
    dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=1000, dropout=0.0),
    dict(n_layer=3, n_head=6, n_embd=96, n_positions=64, vocab_size=503, dropout=0.1),
])
def test_logits_equal_huggingface_gpt2_with_the_same_weights(shape):
    hf = hf_model(**shape)
    ours = GPT(gpt_config(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"],
                          block_size=shape["n_positions"], vocab_size=shape["vocab_size"],
                          dropout=shape["dropout"], bias=True)).eval()
    ours.load_state_dict(hf_to_ours(hf.state_dict(), shape["n_layer"]))
    idx = torch.randint(0, shape["vocab_size"], (3, shape["n_positions"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_logits_equal_huggingface_gpt2_at_realistic_weight_scale():
    """Weights drawn at std 0.2 (LayerNorm gains around 1, biases non-zero) make activations
    large enough that the GELU variant, LayerNorm's eps, attention's 1/sqrt(head_dim) and the
    weight layout each move the logits far beyond float32 rounding; std 0.02 hides them."""
    shape = dict(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=300, dropout=0.0)
    hf = hf_model(**shape)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            centre = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
            p.copy_(centre + 0.2 * torch.randn(p.shape, generator=g))
    ours = GPT(gpt_config(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=300)).eval()
    ours.load_state_dict(hf_to_ours(hf.state_dict(), 2))
    idx = torch.randint(0, 300, (2, 32), generator=g)
    with torch.no_grad():
        want = hf(idx).logits
        got = ours(idx)
    assert want.std() > 1.0  # far from the tiny logits of std-0.02 weights
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * want.abs().max().item())


def test_export_to_huggingface_layout_round_trips():
    ours = GPT(gpt_config("tiny", vocab_size=300, block_size=32))
    ours.init_weights(3)
    sd = ours.state_dict()
    back = hf_to_ours(ours_to_hf(sd, 2), 2)
    assert sd.keys() == back.keys()
    assert all(torch.equal(sd[k], back[k]) for k in sd)


@pytest.mark.parametrize("size", list(GPT2_PARAMS))
def test_gpt2_sizes_have_gpt2_parameter_counts(size):
    with torch.device("meta"):
        model = GPT(gpt_config(size))
    assert model.num_params() == GPT2_PARAMS[size]


def test_embedding_and_lm_head_share_one_tensor():
    model = GPT(gpt_config("tiny", vocab_size=100, block_size=16))
    assert model.lm_head.weight is model.wte.weight


def test_tie_survives_meta_init_when_retied():
    with torch.device("meta"):
        model = GPT(gpt_config("tiny", vocab_size=100, block_size=16))
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights(0)
    assert model.lm_head.weight is model.wte.weight


def test_init_uses_gpt2_std_with_scaled_residual_projections():
    model = GPT(gpt_config(n_layer=8, n_head=4, n_embd=256, vocab_size=2000, block_size=64))
    model.init_weights(0)
    resid = 0.02 / math.sqrt(2 * 8)
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(resid, rel=0.02)
    assert model.blocks[3].attn.proj.weight.std().item() == pytest.approx(resid, rel=0.02)
    assert torch.all(model.blocks[0].attn.q.bias == 0)
    assert torch.all(model.ln_f.weight == 1)


def test_init_depends_only_on_seed_and_parameter_name():
    a = GPT(gpt_config("tiny", vocab_size=100, block_size=16))
    b = GPT(gpt_config(n_layer=4, n_head=2, n_embd=64, vocab_size=100, block_size=16))
    a.init_weights(7)
    b.init_weights(7)
    # b has more layers, created in another order of RNG use, yet shared names draw the same values
    assert torch.equal(a.blocks[1].attn.k.weight, b.blocks[1].attn.k.weight)
    a.init_weights(8)
    assert not torch.equal(a.blocks[1].attn.k.weight, b.blocks[1].attn.k.weight)


def test_attention_is_causal():
    model = GPT(gpt_config("tiny", vocab_size=50, block_size=16)).eval()
    idx = torch.randint(0, 50, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 50
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_longer_than_block_size_is_refused():
    model = GPT(gpt_config("tiny", vocab_size=50, block_size=8))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_generate_appends_tokens_and_top_k_1_is_greedy():
    model = GPT(gpt_config("tiny", vocab_size=50, block_size=8)).eval()
    idx = torch.tensor([[1, 2, 3]])
    greedy = model.generate(idx, 12, temperature=0)  # longer than block_size: context is cropped
    top1 = model.generate(idx, 12, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert greedy.shape == (1, 15) and torch.equal(greedy[:, :3], idx)
    assert torch.equal(greedy, top1)


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = GPT(gpt_config("tiny", vocab_size=50, block_size=8)).eval()
    idx = torch.tensor([[1]])
    a = model.generate(idx, 10, generator=torch.Generator().manual_seed(5))
    b = model.generate(idx, 10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_a_different_seed_gives_a_different_sample():
    model = GPT(gpt_config("tiny", vocab_size=50, block_size=8))
    model.init_weights(0)
    model.eval()
    idx = torch.tensor([[1]])
    samples = {tuple(model.generate(idx, 10, generator=torch.Generator().manual_seed(s))[0].tolist())
               for s in range(4)}
    assert len(samples) == 4


def test_flops_per_token_follows_the_palm_formula_for_gpt2():
    with torch.device("meta"):
        model = GPT(gpt_config("gpt2"))
    n = 124_439_808 - 1024 * 768  # position table is a lookup, not a matmul
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 12 * 64 * 1024


def test_small_sizes_are_well_formed():
    for name, (layers, heads, width) in SIZES.items():
        assert width % heads == 0, name


@pytest.fixture(scope="module")
def trained_run(data_root, tmp_path_factory):
    """A tiny run folder and the parameter count its training printed."""
    run_dir = tmp_path_factory.mktemp("run")
    p = run_module("scaling.train", *tiny_args(data_root, run_dir, "--train.max_steps=2", "--train.eval_every=2",
                                               "--logging.sample_tokens=0"), check=True)
    return run_dir, int(re.search(r"model: ([\d,]+) parameters", p.stdout)[1].replace(",", ""))


@pytest.mark.parametrize("form", ["run folder", "checkpoint folder", "pt", "hf", "nanogpt"])
def test_a_loaded_model_has_its_lm_head_tied_to_the_embedding(form, trained_run, tmp_path):
    """Loading materialises the model and fills both names from the saved tensors: an untied head
    gives the same logits, so only identity (and the count, which then holds the table twice)
    shows it. sample uses load_model (our folders), eval load_any (every format)."""
    from scaling.weights import load_any, load_model, read_weights_and_tokenizer, write_weights
    run_dir, printed = trained_run
    if form == "run folder":
        model = load_model(run_dir)[0]
    elif form == "checkpoint folder":
        model = load_model(run_dir / "checkpoints" / "step_2")[0]
    else:
        sd, cfg, vocab, tok = read_weights_and_tokenizer(run_dir)
        dst = tmp_path / ("hf" if form == "hf" else f"{form}.pt")
        write_weights(sd, cfg, dst, form, vocab, tok)
        model = load_any(str(dst), "cpu")[0]
    tied = model.lm_head.weight is model.wte.weight
    assert tied, "lm_head.weight is a tensor of its own, not wte.weight"
    assert model.num_params() == printed


def test_the_compiled_head_and_loss_give_the_eager_loss_and_gradients():
    """parallelize() compiles model.head_loss (final norm, LM head, fp32 cross-entropy) as one
    graph: the same loss and gradients as eager, within fp32 rounding."""
    from scaling.parallel import apply_compile
    torch.manual_seed(0)
    eager = GPT(gpt_config("tiny", block_size=32, vocab_size=300))
    eager.init_weights(0)
    compiled = GPT(gpt_config("tiny", block_size=32, vocab_size=300))
    compiled.load_state_dict(eager.state_dict())
    apply_compile(compiled)
    x, y = torch.randint(0, 300, (3, 32)), torch.randint(0, 300, (3, 32))
    losses = []
    for m in (eager, compiled):
        loss = m(x, y)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_logits_of_one_position_are_that_position_of_all_logits():
    """generate() asks the LM head for the last position only (at=): the same logits."""
    m = GPT(gpt_config("tiny", block_size=32, vocab_size=300)).eval()
    m.init_weights(0)
    x = torch.randint(0, 300, (2, 20))
    torch.testing.assert_close(m(x, at=13)[:, 0], m(x)[:, 13], rtol=0, atol=1e-6)


def test_the_loss_with_targets_is_huggingface_gpt2s_loss_with_the_same_weights():
    """model(x, targets) computes the loss inside forward (head_loss): the mean next-token
    cross-entropy, as GPT2LMHeadModel computes it from labels."""
    shape = dict(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=300, dropout=0.0)
    hf = hf_model(**shape)
    ours = GPT(gpt_config(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=300)).eval()
    ours.load_state_dict(hf_to_ours(hf.state_dict(), 2))
    idx = torch.randint(0, 300, (3, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(idx, labels=idx).loss.item()
        got = ours(idx[:, :-1], idx[:, 1:]).item()
    assert got == pytest.approx(want, rel=1e-5)
