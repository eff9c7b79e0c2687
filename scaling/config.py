"""The recipe schema: dataclasses, YAML loading, --section.key=value overrides, validation.

Every mistake a user can make in a recipe or on the command line becomes a ConfigError with
one line that names the key; the entry points print it and exit with code 2.
"""

import copy
import dataclasses
import difflib
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from scaling.errors import ConfigError, die
from scaling.model import SIZES, GPTConfig, gpt_config


def opt(default, doc, choices=None):
    """A config field with its one-line documentation (shown by --help) and allowed values."""
    return field(default=default, metadata={"doc": doc, "choices": choices})


@dataclass
class ModelConfig:
    size: str | None = opt(None, "named size; n_layer/n_head/n_embd override it", list(SIZES))
    n_layer: int | None = opt(None, "number of transformer blocks")
    n_head: int | None = opt(None, "attention heads per block")
    n_embd: int | None = opt(None, "model width")
    block_size: int = opt(1024, "longest sequence the model accepts (position table size)")
    vocab_size: int | None = opt(None, "vocabulary size; null takes the dataset's tokenizer size")
    dropout: float = opt(0.0, "dropout probability (0 for pre-training, as in nanoGPT)")
    bias: bool = opt(True, "biases in Linear and LayerNorm layers (GPT-2 has them)")
    init_from: str | None = opt(None, "start from these weights: a Hugging Face GPT-2 folder, a nanoGPT "
                                "ckpt.pt, or our checkpoint / .pt (see python -m scaling.convert)")


@dataclass
class DataConfig:
    root: str = opt("data", "folder holding prepared datasets")
    dataset: str = opt("embedded", "dataset name: token files in <root>/<dataset>/")
    tokenizer: str | None = opt(None, "expected tokenizer (checked against the dataset's meta.json)",
                                ["byte", "char", "gpt2"])
    workers: int = opt(1, "loader processes per rank reading batches ahead of the step; 0 reads them in the "
                       "training process when needed (no read-ahead)")
    prefetch_steps: int = opt(2, "optimizer steps of micro batches the workers keep read ahead")


@dataclass
class TrainConfig:
    seed: int = opt(1337, "seed for initialisation, data order and dropout")
    max_steps: int = opt(1000, "optimizer steps to train for")
    seq_len: int | None = opt(None, "tokens per sample; null means model.block_size")
    micro_batch_size: int = opt(12, "sequences per forward/backward on one rank")
    global_batch_size: int | None = opt(
        None, "sequences per optimizer step over all ranks; null means micro_batch_size x data-parallel ranks")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this; 0 disables")
    spike_zscore: float = opt(0.0, "loss-spike guard: skip an update whose gradient norm lies this many standard "
                              "deviations above the recent ones (e.g. 6); 0 disables")
    spike_window: int = opt(100, "loss-spike guard: how many recent accepted steps' gradient norms it compares with")
    eval_every: int = opt(250, "steps between validation passes; 0 disables")
    gc_every: int = opt(50, "steps between Python garbage collections, at the same step on every rank (its "
                        "automatic collections would pause ranks at different moments and make the others wait); "
                        "0 leaves them to Python")
    eval_sequences: int = opt(240, "validation sequences per evaluation (the first ones of the split, every time)")
    dtype: str = opt("fp32", "compute dtype: fp32, or bf16 mixed precision (bf16 compute on fp32 master weights, "
                     "FSDP2's policy in every layout, CPU and CUDA)", ["fp32", "bf16"])
    device: str = opt("auto", "auto picks cuda when present, else cpu", ["auto", "cpu", "cuda"])
    tf32: bool = opt(True, "CUDA: fp32 matmuls in TF32 (fp32 range, 10-bit mantissa; several times faster on "
                     "A100/H100); false for exact IEEE fp32. No effect on CPUs or on bf16 compute")
    on_nonfinite: str = opt("stop", "a NaN/inf loss or gradient norm: stop the run (the last checkpoint "
                            "stays as it was), or skip that batch's update", ["stop", "skip"])


@dataclass
class OptimConfig:
    lr: float = opt(6e-4, "peak learning rate")
    min_lr: float = opt(6e-5, "learning rate at the end of the decay")
    warmup_steps: int = opt(2000, "linear warmup steps from 0 to lr")
    decay_steps: int | None = opt(None, "steps of cosine decay after warmup; null means until max_steps")
    weight_decay: float = opt(0.1, "AdamW weight decay on matrices (not on biases, norms)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")


@dataclass
class ParallelConfig:
    dp_replicate: int = opt(1, "data-parallel replicas (DDP; with dp_shard > 1, HSDP); -1 = the rest")
    dp_shard: int = opt(-1, "FSDP shard degree; -1 = the rest of the world size")
    tp: int = opt(1, "tensor-parallel degree (heads and MLP split across ranks)")
    activation_checkpoint: str = opt("none", "recompute block activations in backward: none, full (every "
                                     "block) or selective (every ac_every-th block)", ["none", "full", "selective"])
    ac_every: int = opt(2, "with selective activation checkpointing, checkpoint every n-th block")
    compile: bool | None = opt(None, "torch.compile each block; null: on for CUDA, off for CPU")
    reshard_after_forward: bool = opt(True, "FSDP: free gathered block parameters after forward "
                                      "(less memory, one more all-gather in backward); ignored when dp_shard is 1 "
                                      "(DDP, one process, pure TP): blocks keep their parameters there")
    sequence_parallel: bool = opt(True, "TP: split LayerNorm/dropout activations over the sequence too")
    loss_parallel: bool = opt(True, "TP: keep logits sharded over the vocabulary through the loss")
    timeout_s: int = opt(600, "seconds a collective may wait before the run fails")


@dataclass
class CheckpointConfig:
    every: int = opt(0, "steps between checkpoints; 0 saves only at the end")
    keep: int = opt(3, "newest checkpoints to keep; 0 keeps all")
    keep_every: int = opt(0, "also keep every checkpoint whose step is a multiple of this, for good; 0: none")
    resume: str = opt("auto", "auto (newest complete in run_dir), none, or a checkpoint or run folder")
    async_save: bool = opt(True, "write checkpoints in the background while training continues")
    verify: bool = opt(True, "verify a checkpoint's checksums before resuming from it (reads it once, "
                       "in the background while the model is built)")


@dataclass
class LoggingConfig:
    every: int = opt(10, "steps between metric lines")
    run_dir: str | None = opt(None, "where metrics and checkpoints go; null means runs/<recipe name>")
    wandb: bool = opt(False, "also log to Weights & Biases")
    wandb_project: str = opt("scaling", "wandb project")
    wandb_mode: str = opt("online", "online, or offline (no network, no account; wandb sync later)",
                          ["online", "offline"])
    oom_snapshot: bool = opt(False, "CUDA: record allocations and, on out-of-memory, write the history to "
                             "<run_dir>/oom_snapshot_rank<r>.pickle (view at pytorch.org/memory_viz)")
    profile_steps: str | None = opt(None, "record a torch.profiler trace of these steps, e.g. '10-12', "
                                    "into <run_dir>/profile/")
    sample_tokens: int = opt(0, "tokens to sample and print at the end of training; 0 disables")
    sample_prompt: str = opt("\n", "prompt for the end-of-training sample")
    sample_temperature: float = opt(0.8, "temperature of the end-of-training sample (top-k 200, seed "
                                    "train.seed); 0 is greedy")


@dataclass
class Config:
    name: str = opt("run", "recipe name (the file's stem)")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


SECTIONS = [f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.type)]


def _section_types():
    return {f.name: f.type for f in dataclasses.fields(Config) if f.name in SECTIONS}


def _nearest(word, options):
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean {close[0]}?)" if close else ""


def _check_type(key, value, hint):
    """Return value converted to the field's type, or raise ConfigError naming the key."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{key}: must not be null")
    for t in allowed:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"{key}: expected {names}, got {value!r}")


def _check_key(key: str):
    """Raise ConfigError unless key is 'section.field' of the schema, naming the nearest valid key."""
    all_keys = [f"{s}.{f.name}" for s, t in _section_types().items() for f in dataclasses.fields(t)]
    if key not in all_keys:
        raise ConfigError(f"{key}: unknown key{_nearest(key, all_keys + SECTIONS)}")


def _set(cfg: Config, key: str, value):
    """Set 'section.field' on cfg with type checking; unknown keys name the nearest valid one."""
    _check_key(key)
    section, name = key.split(".")
    section = getattr(cfg, section)
    f = {f.name: f for f in dataclasses.fields(section)}[name]
    hint = typing.get_type_hints(type(section))[f.name]
    value = _check_type(key, value, hint)
    choices = f.metadata.get("choices")
    if choices and value is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    setattr(section, f.name, value)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 6e-4 as a string (it wants 6.0e-4); users mean a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*|\.\d+)[eE][-+]?\d+$|^[-+]?(?:\d[\d_]*)?\.\d+$|^[-+]?\d[\d_]*\.$"),
    list("-+0123456789."))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def _parse_value(text: str):
    """Command-line values are YAML scalars: 3 -> int, 3e-4 -> float, true -> bool, null -> None."""
    try:
        return _yaml(text)
    except yaml.YAMLError:
        return text


def parse_overrides(args: list[str]) -> list[tuple[str, object]]:
    """['--a.b=c', '--d.e', 'f'] -> [('a.b', c), ('d.e', f)]."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"{arg}: expected --section.key=value")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, text = arg[2:], args[i + 1]
            i += 1
        else:
            _check_key(arg[2:])
            raise ConfigError(f"{arg[2:]}: no value given (use --{arg[2:]}=VALUE)")
        out.append((key, _parse_value(text)))
        i += 1
    return out


def load_config(path: str | None, overrides: list[str] = (), world: int | None = None,
                per_node: int | None = None) -> Config:
    """Recipe file (may be None for all defaults) + overrides -> validated Config.

    world and per_node (processes in all and on each node) default to what the launcher
    announced; give them to check a recipe at a layout without launching it."""
    cfg, _ = _read(path, overrides)
    resolve(cfg, world, per_node)
    return cfg


def _read(path: str | None, overrides: list[str]) -> tuple[Config, dict[str, str]]:
    """Recipe file + overrides -> the Config before resolve(), and for each key they set, which
    of the two set it last ('recipe' or 'override'): what --help shows."""
    cfg, given = Config(), {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe not found: {path}")
        try:
            raw = _yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{where} is not valid YAML") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a recipe is a mapping of sections ({', '.join(SECTIONS)})")
        cfg.name = str(raw.pop("name", p.stem))  # a resolved config.yaml carries its name
        for section, values in raw.items():
            if section not in SECTIONS:
                raise ConfigError(f"{section}: unknown section{_nearest(str(section), SECTIONS)}")
            if not isinstance(values, dict):
                raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
            for k, v in values.items():
                _set(cfg, f"{section}.{k}", v)
                given[f"{section}.{k}"] = "recipe"
    for key, value in parse_overrides(list(overrides)):
        _set(cfg, key, value)
        given[key] = "override"
    return cfg, given


def resolve(cfg: Config, world: int | None = None, per_node: int | None = None):
    """Fill derived values and check the combinations a single field cannot check."""
    m, t, o = cfg.model, cfg.train, cfg.optim
    if m.size is not None:
        for name, n in zip(("n_layer", "n_head", "n_embd"), SIZES[m.size]):
            if getattr(m, name) is None:
                setattr(m, name, n)
    for name in ("n_layer", "n_head", "n_embd"):
        if getattr(m, name) is None:
            raise ConfigError(f"model.{name}: not set (give model.size or all of n_layer, n_head, n_embd)")
    _positive(cfg, "model.n_layer", "model.n_head", "model.n_embd", "model.block_size",
              "train.max_steps", "train.micro_batch_size", "train.eval_sequences", "logging.every")
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.n_embd: {m.n_embd} is not divisible by model.n_head={m.n_head}")
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"model.dropout: {m.dropout} is not in [0, 1)")
    if t.seq_len is None:
        t.seq_len = m.block_size
    _positive(cfg, "train.seq_len")
    if t.seq_len > m.block_size:
        raise ConfigError(f"train.seq_len: {t.seq_len} exceeds model.block_size={m.block_size}")
    if t.global_batch_size is not None:
        _positive(cfg, "train.global_batch_size")  # its divisibility needs the layout: _resolve_parallel
    _resolve_parallel(cfg, world, per_node)
    _check_optim(o)
    if t.grad_clip < 0:  # a negative clip coefficient flips every gradient: gradient ascent
        raise ConfigError(f"train.grad_clip: must be >= 0 (0 disables clipping), got {t.grad_clip}")
    if t.spike_zscore < 0:
        raise ConfigError(f"train.spike_zscore: must be >= 0 (0 disables the guard), got {t.spike_zscore}")
    _positive(cfg, "train.spike_window", "parallel.timeout_s", "data.prefetch_steps")
    _check_profile_steps(cfg.logging.profile_steps)
    if not 0 <= cfg.logging.sample_temperature < math.inf:
        raise ConfigError(f"logging.sample_temperature: must be finite and >= 0 (0 is greedy), "
                          f"got {cfg.logging.sample_temperature}")
    for key in ("data.workers", "optim.warmup_steps", "train.eval_every", "train.gc_every", "checkpoint.every",
                "checkpoint.keep", "checkpoint.keep_every", "logging.sample_tokens"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {_get(cfg, key)}")
    if cfg.logging.run_dir is None:
        cfg.logging.run_dir = f"runs/{cfg.name}"


def _resolve_parallel(cfg: Config, world: int | None, per_node: int | None):
    """Replace -1 degrees by numbers for the world size (by default the one the launcher set), and
    check the layout against the model and the batch before any process group exists."""
    from scaling.distributed import local_world_size, world_size
    from scaling.parallel.dims import check_model, resolve_dims

    p, t = cfg.parallel, cfg.train
    dims = resolve_dims(p, world or world_size())
    per_node = per_node or local_world_size()
    if per_node and per_node % dims.tp:
        raise ConfigError(f"parallel.tp: {dims.tp} does not fit the {per_node} processes per node "
                          "(tensor-parallel groups stay inside a node)")
    check_model(dims, cfg.model.n_head, cfg.model.n_embd)
    if p.sequence_parallel and t.seq_len % dims.tp:
        raise ConfigError(f"train.seq_len: {t.seq_len} is not divisible by parallel.tp={dims.tp} "
                          "(sequence parallelism splits it)")
    p.dp_replicate, p.dp_shard, p.tp = dims.dp_replicate, dims.dp_shard, dims.tp
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * dims.dp
    elif t.global_batch_size % dims.dp:
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} sequences do not split over "
                          f"{dims.dp} data-parallel ranks; " + _batch_fixes(t.global_batch_size, t.micro_batch_size, dims.dp))
    elif (share := t.global_batch_size // dims.dp) % t.micro_batch_size:
        # A run resumed on fewer (or more) ranks keeps its global batch; the micro batch gives way.
        micro = max(m for m in range(1, t.micro_batch_size) if share % m == 0)
        if os.environ.get("RANK", "0") == "0":  # every rank resolves the same config
            # stderr: stdout may be --print-config's YAML
            print(f"warning: train.micro_batch_size {t.micro_batch_size} does not divide the {share} sequences per "
                  f"rank of train.global_batch_size={t.global_batch_size} over {dims.dp} data-parallel ranks: "
                  f"using {micro} ({share // micro} micro batches per step)", file=sys.stderr, flush=True)
        t.micro_batch_size = micro
    if p.ac_every < 1:
        raise ConfigError(f"parallel.ac_every: must be > 0, got {p.ac_every}")


def _batch_fixes(batch: int, micro: int, dp: int) -> str:
    """What would split: the global batches nearest this one that dp ranks take in whole micro
    batches of the configured size."""
    step = micro * dp
    below = batch // step * step
    return "use a global batch of " + _or([b for b in (below, below + step) if b > 0])


def _or(numbers: list[int]) -> str:
    """[6, 10, 15] -> '6, 10 or 15'."""
    words = [str(n) for n in numbers]
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]


def _check_optim(o: OptimConfig):
    for key in ("lr", "min_lr", "weight_decay"):
        if getattr(o, key) < 0:
            raise ConfigError(f"optim.{key}: must be >= 0, got {getattr(o, key)}")
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr: {o.min_lr} is larger than optim.lr={o.lr}")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(o, key) < 1:
            raise ConfigError(f"optim.{key}: must be in [0, 1), got {getattr(o, key)}")
    if o.eps <= 0:
        raise ConfigError(f"optim.eps: must be > 0, got {o.eps}")
    if o.decay_steps is not None and o.decay_steps < 0:
        raise ConfigError(f"optim.decay_steps: must be >= 0, got {o.decay_steps}")


PROFILE_STEPS = re.compile(r"^(\d+)(?:-(\d+))?$")


def profile_range(text: str) -> tuple[int, int]:
    """'10-12' -> (10, 12), '5' -> (5, 5): the steps (counted from 1) a profile records."""
    m = PROFILE_STEPS.match(text.strip())
    if not m:
        raise ConfigError(f"logging.profile_steps: expected a step or a range like '10-12', got {text!r}")
    first, last = int(m.group(1)), int(m.group(2) or m.group(1))
    if not 1 <= first <= last:
        raise ConfigError(f"logging.profile_steps: expected 1 <= first <= last, got {text!r}")
    return first, last


def _check_profile_steps(text: str | None):
    if text is not None:
        profile_range(text)


def _get(cfg, key):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _positive(cfg, *keys):
    for key in keys:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be > 0, got {_get(cfg, key)}")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML: a run's config.yaml and --print-config; load_config reads it back."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: Path):
    path.write_text(config_yaml(cfg))


def config_help(path: str | None = None, overrides: list[str] = (), world: int | None = None) -> str:
    """Every key with its type and documentation: the output of --help. Without a recipe, each
    key's default; with one, the value it will run with (overrides applied, resolved for the world
    size) and where that value came from."""
    cfg = Config()
    if path is None:
        lines = []
    else:
        cfg, given = _read(path, overrides)
        before = copy.deepcopy(cfg)
        resolve(cfg, world)
        lines = [_what(path, overrides, world),
                 "[source] of each value: default (the schema), recipe, override (the command line), or",
                 "derived (filled in for this recipe and world size)", ""]
    for section, t in _section_types().items():
        lines.append(f"{section}:")
        hints = typing.get_type_hints(t)
        for f in dataclasses.fields(t):
            key, doc = f"{section}.{f.name}", f.metadata["doc"]
            typ = str(hints[f.name]).replace("NoneType", "None").replace("<class '", "").replace("'>", "")
            if path is None:
                lines.append(f"  {key} ({typ}, default {f.default!r}): {doc}")
                continue
            value, source = _get(cfg, key), given.get(key, "default")
            if value != _get(before, key):  # resolve() filled in a null or turned a -1 into a degree
                source = "derived" if source == "default" else f"derived from {source} {_get(before, key)!r}"
            lines.append(f"  {key} ({typ}) = {value!r}  [{source}]: {doc}")
    return "\n".join(lines)


def _what(path: str, overrides: list[str], world: int | None) -> str:
    """'recipes/x.yaml + 2 overrides, resolved for 16 processes': the first line of --help and --print-config."""
    from scaling.distributed import world_size

    n, k = world or world_size(), len(parse_overrides(list(overrides)))
    changes = f" + {k} override{'s' if k > 1 else ''}" if k else ""
    return f"{path}{changes}, resolved for {n} process{'es' if n > 1 else ''}"


FLAGS = """  --help          with RECIPE: each key's value for it and where the value came from
  --print-config  print the resolved recipe as YAML (a run's config.yaml) and exit; starts nothing
  --world N       with --help or --print-config: resolve for N processes (default: WORLD_SIZE, else 1)"""


def _take(argv: list[str], flag: str) -> str | None:
    """Remove '--flag N' or '--flag=N' from argv and return N (None when absent)."""
    for i, arg in enumerate(argv):
        if arg.startswith(flag + "="):
            del argv[i]
            return arg.split("=", 1)[1]
        if arg == flag:
            if i + 1 == len(argv):
                raise ConfigError(f"{flag}: no value given (use {flag}=N)")
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
    return None


def _world(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"--world: expected a number of processes >= 1, got {text!r}")
    return int(text)


def main_with_config(argv: list[str], usage: str):
    """Parse 'RECIPE [--a.b=c ...] [--help | --print-config [--world N]]' for an entry point.

    Bad input exits 2 with one line, said by rank 0 alone: under torchrun every rank reads the same
    recipe and would print the same line."""
    argv = list(argv)
    helping = any(a in ("-h", "--help") for a in argv)  # anywhere on the line, as users type it
    printing = "--print-config" in argv
    argv = [a for a in argv if a not in ("-h", "--help", "--print-config")]
    try:
        world = _world(_take(argv, "--world"))
        if world and not (helping or printing):
            raise ConfigError("--world: only with --print-config or --help (a run's world size is the launcher's)")
        recipe = argv[0] if argv and not argv[0].startswith("-") else None
        if helping:
            print(f"usage: {usage}\n{FLAGS}\n\n{config_help(recipe, argv[1:], world)}")
            sys.exit(0)
        if recipe is None:
            die(f"usage: {usage}", every_rank=False)
        cfg = load_config(recipe, argv[1:], world)
    except ConfigError as e:
        die(str(e), every_rank=False)
    if printing:  # the comment says which world size the parallel degrees and batch were fixed for
        print(f"# {_what(recipe, argv[1:], world)}\n{config_yaml(cfg)}", end="")
        sys.exit(0)
    return cfg


def model_config(cfg: Config, vocab_size: int) -> GPTConfig:
    """The recipe's model section as the model's own config; vocab_size fills model.vocab_size
    when the recipe leaves it to the dataset."""
    m = cfg.model
    return gpt_config(n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, block_size=m.block_size,
                      vocab_size=m.vocab_size or vocab_size, dropout=m.dropout, bias=m.bias)
