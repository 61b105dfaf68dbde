"""python -m ziya_jax.compile --config configs/ziya_chat_14b.py:stage=3 --topology v5e-64

Ahead-of-time compilation for a TPU topology on this host (CPU + libtpu, no TPU needed): the real train step
(train_step on the sharded TrainState, jitted by ziya_jax.train.sharded.jit_train_step) and one decode step (a
token against a full KV cache; with --quantize int8, the decode step with bfloat16 weights and with those weights
quantised by ziya_jax.quantize, side by side). Nothing is allocated: every input is a ShapeDtypeStruct carrying its
sharding. For each program it prints per-chip memory (arguments, temporaries, total against the chip's HBM),
FLOPs per step and a roofline step time; a program that does not fit in HBM is reported with the compiler's
reason and the command exits with status 1.

Topologies: v5e-N and v6e-N (N chips), v4-N and v5p-N (N TensorCores, two per chip, as Cloud TPU names them),
or libtpu's own names (v5e:8x8, v4:2x2x4). --num-slices compiles for a multi-slice pod (the config's mesh.dcn
spans the slices). --llm-depths 4,40 times the compilation of the scanned LLaMA stack at several depths instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import sys
import time

from ziya_jax.accelerators import TPUS, Chip, GiB


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as the user gave it
    chip: Chip
    libtpu_topology: str  # e.g. v5e:8x8
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(int(d) for d in self.libtpu_topology.split(":")[1].split("x"))

    @property
    def accelerator_type(self) -> str:
        """Cloud TPU's name for one slice, e.g. v5litepod-64, v4-32."""
        return f"{self.chip.accelerator}-{self.chips_per_slice * self.chip.cores_per_chip}"


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The usual slice shape for a power-of-two chip count: 2D (v5e, v6e) as 4x4, 4x8, 8x8, ...; 3D (v4, v5p)
    grown from 2x2x1 by doubling the last of the smallest dimensions (2x2x2, 2x2x4, 2x4x4, 4x4x4, ...)."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{chips} chips: give the topology as libtpu names it (e.g. v5e:4x8) for such sizes")
    if dims == 2:
        a = 1 << (int(math.log2(chips)) // 2)
        return (a, chips // a)
    if chips < 4:
        raise ValueError(f"{chips} chips: the smallest 3D slice has 4 chips")
    shape = [2, 2, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        shape[max(i for i, s in enumerate(shape) if s == smallest)] *= 2
    return tuple(shape)


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """'v5e-64' (Cloud TPU size), 'v4-32' (TensorCores) or 'v5e:8x8' (libtpu) -> Topology."""
    m = re.fullmatch(r"(v4|v5e|v5p|v6e)([-:])(\d+(?:x\d+)*)", name.strip().lower())
    if not m:
        raise ValueError(
            f"unknown topology {name!r}: use e.g. v5e-64, v6e-16, v4-32, v5p-128 or v5e:8x8 "
            f"(generations {', '.join(TPUS)})"
        )
    family, sep, size = m.groups()
    chip = TPUS[family]
    if sep == ":":
        dims = tuple(int(d) for d in size.split("x"))
        if len(dims) != chip.torus_dims:
            raise ValueError(f"{name}: {family} slices have {chip.torus_dims} dimensions")
    else:
        if "x" in size or int(size) % chip.cores_per_chip:
            unit = "TensorCores (2 per chip)" if chip.cores_per_chip == 2 else "chips"
            raise ValueError(f"{name}: {family}-N counts {unit}")
        dims = torus_shape(int(size) // chip.cores_per_chip, chip.torus_dims)
    if num_slices < 1:
        raise ValueError(f"--num-slices must be >= 1, got {num_slices}")
    return Topology(name, chip, f"{chip.libtpu_name}:{'x'.join(map(str, dims))}", num_slices)


def topology_devices(topo: Topology):
    """Compile-only TPU devices of the topology (libtpu on this host; no TPU needed)."""
    # libtpu would otherwise look for TPU metadata and worker names, which a CPU host does not have.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: several such processes may run at once
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError(
            "libtpu is not installed; `pip install -e '.[tpu]'` (or `pip install jax[tpu]`) "
            "lets this host compile for TPUs"
        )
    from jax.experimental import topologies

    kwargs = {"chip_config_name": "megacore"} if topo.chip.cores_per_chip == 2 else {}
    if topo.chips_per_slice < 4:  # single-chip and 2-chip slices have smaller hosts than the default 2x2x1
        kwargs["chips_per_host_bounds"] = (*(int(d) for d in topo.libtpu_topology.split(":")[1].split("x")), 1)[:3]
    if topo.num_slices > 1:
        kwargs["num_slices"] = topo.num_slices
    return topologies.get_topology_desc(topology_name=topo.libtpu_topology, platform="tpu", **kwargs).devices


@dataclasses.dataclass
class Result:
    program: str  # train_step | decode_step | llama_N_layers
    topology: str
    chips: int
    mesh: dict
    batch: int
    remat: str
    fits: bool
    compile_s: float
    hbm_gib: float
    argument_gib: float = 0.0
    output_gib: float = 0.0
    alias_gib: float = 0.0
    temp_gib: float = 0.0
    total_gib: float = 0.0
    flops_per_chip: float = 0.0
    roofline_s: float = 0.0
    bound: str = ""
    error: str = ""

    def line(self) -> str:
        where = (
            f"{self.program} on {self.topology} ({self.chips} chips, mesh {self.mesh}), batch {self.batch}, "
            f"remat {self.remat}"
        )
        if not self.fits:
            return f"{where}: DOES NOT FIT ({self.error})"
        return (
            f"{where}: per chip {self.total_gib:.2f} of {self.hbm_gib:.1f} GiB HBM (arguments "
            f"{self.argument_gib:.2f}, temporaries {self.temp_gib:.2f}, outputs not aliased "
            f"{self.output_gib - self.alias_gib:.2f}); {self.flops_per_chip / 1e12:.2f} TFLOP per chip; "
            f"roofline {self.roofline_s * 1e3:.1f} ms ({self.bound}-bound); compiled in {self.compile_s:.0f} s"
        )


def _compile(jitted, args, mesh, rules):
    """(compiled or None, FLOPs of the traced program, error text, seconds); XLA's out-of-memory is an answer."""
    import flax.linen as nn
    import jax

    from ziya_jax.train.observe import matmul_flops

    start = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        traced = jitted.trace(*args)
        flops = matmul_flops(traced.jaxpr.jaxpr)
        try:
            compiled = traced.lower().compile()
        except jax.errors.JaxRuntimeError as e:
            message = str(e).strip().splitlines()[0]
            if "RESOURCE_EXHAUSTED" not in message:
                raise
            return None, flops, message.split("RESOURCE_EXHAUSTED:", 1)[-1].strip(), time.perf_counter() - start
    return compiled, flops, "", time.perf_counter() - start


def _result(program, topo: Topology, mesh, batch, remat, compiled, flops, error, seconds) -> Result:
    chips = mesh.devices.size
    r = Result(
        program,
        topo.name + (f" x{topo.num_slices} slices" if topo.num_slices > 1 else ""),
        chips,
        dict(mesh.shape),
        batch,
        remat,
        compiled is not None,
        seconds,
        topo.chip.hbm_bytes / GiB,
        flops_per_chip=flops / chips,
        error=error,
    )
    if compiled is None:
        return r
    m = compiled.memory_analysis()
    r.argument_gib, r.output_gib = m.argument_size_in_bytes / GiB, m.output_size_in_bytes / GiB
    r.alias_gib, r.temp_gib = m.alias_size_in_bytes / GiB, m.temp_size_in_bytes / GiB
    r.total_gib = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
        + m.generated_code_size_in_bytes
    ) / GiB
    # Lower bounds: the matmuls at the chip's peak, and every argument read and output written once from HBM.
    compute = r.flops_per_chip / topo.chip.peak_flops
    memory = (m.argument_size_in_bytes + m.output_size_in_bytes) / topo.chip.hbm_bandwidth
    r.roofline_s, r.bound = max(compute, memory), "compute" if compute >= memory else "memory"
    r.fits = r.total_gib <= r.hbm_gib
    if not r.fits:
        r.error = f"{r.total_gib:.2f} GiB per chip > {r.hbm_gib:.1f} GiB HBM"
    return r


def setup(config, devices, batch_size=None, remat=None, mesh=None, dcn=None, rows_per_shard=None):
    """(model config, mesh, rules, data section or None) of a config with the command's overrides;
    rows_per_shard sets the global batch to that many rows per batch shard (it then grows with the topology)."""
    import ml_collections

    from ziya_jax.config import ModelConfig
    from ziya_jax.sharding import make_mesh, rules_from_config

    model = config.model.to_dict()
    if remat:
        model["remat_policy"] = remat
    cfg = ModelConfig.from_dict(model)
    ici, config_dcn = (
        (config.mesh["ici"], config.mesh.get("dcn")) if hasattr(config.mesh, "keys") else (config.mesh, None)
    )
    mesh, rules = make_mesh({"ici": mesh or ici, "dcn": dcn or config_dcn}, devices), rules_from_config(config)
    data = ml_collections.ConfigDict(config.data.to_dict()) if "data" in config else None
    if data is not None and (batch_size or rows_per_shard):
        data.batch_size = batch_size or rows_per_shard * _batch_shards(mesh, rules)
    return cfg, mesh, rules, data


def _require(config, section: str, what: str) -> None:
    if section not in config:
        raise ValueError(f"the config has no `{section}` section ({what})")


def compile_train_step(
    config, topo: Topology, devices, batch_size=None, remat=None, mesh=None, dcn=None, rows_per_shard=None
) -> Result:
    from ziya_jax.train.optimizer import logged_lr, make_optimizer
    from ziya_jax.train.sharded import abstract_batch, abstract_train_state, batch_shapes, jit_train_step
    from ziya_jax.train.step import STAGE1_LOSSES, Stage

    cfg, mesh, rules, data = setup(config, devices, batch_size, remat, mesh, dcn, rows_per_shard)
    _require(config, "train", "trainable parameters, losses, optimizer")
    _require(config, "data", "batch_size, text_len, ...")
    stage = Stage.from_config(config.train)
    stage1 = {k for k, _ in stage.loss_weights} <= set(STAGE1_LOSSES)
    tx = make_optimizer(config.train.optimizer)
    state = abstract_train_state(cfg, stage, tx, mesh, rules)
    batch = abstract_batch(batch_shapes(data, cfg, stage1), mesh, rules)
    step = jit_train_step(cfg, stage, tx, logged_lr(config.train.optimizer), mesh, rules)
    return _result(
        "train_step", topo, mesh, data.batch_size, cfg.remat_policy, *_compile(step, (state, batch), mesh, rules)
    )


def _batch_shards(mesh, rules) -> int:
    """How many ways the rules split the batch axis on `mesh` (the smallest batch that fills it)."""
    from ziya_jax.sharding import batch_sharding

    axes = batch_sharding(mesh, 1, rules).spec[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def compile_decode_step(
    config, topo: Topology, devices, batch_size=None, cache_len=None, mesh=None, dcn=None, weights: str = ""
) -> Result:
    """One decode step of the configured model, as ziya_jax.decode runs it inside its loop: a token per row
    against a KV cache of `cache_len` slots (default: the LLM's maximum positions), cache donated. The batch
    defaults to one row per batch shard. weights: '' (the config's param_dtype), 'bfloat16' (every float weight
    cast to it) or 'int8' (those bfloat16 weights through ziya_jax.quantize)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from ziya_jax import quantize
    from ziya_jax.decode import _step
    from ziya_jax.model import ZiyaVisual, abstract_params
    from ziya_jax.sharding import batch_sharding, cache_sharding, param_shardings

    cfg, mesh, rules, _ = setup(config, devices, mesh=mesh, dcn=dcn)
    b = batch_size or _batch_shards(mesh, rules)
    s = cache_len or cfg.llm.max_position_embeddings
    sds = jax.ShapeDtypeStruct
    params, shardings = nn.meta.unbox(abstract_params(cfg)), param_shardings(cfg, mesh, rules)
    if weights:
        params = jax.tree_util.tree_map(
            lambda a: sds(a.shape, jnp.bfloat16 if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype), params
        )
    if weights == "int8":
        params, cfg = quantize.quantize_abstract(params, cfg, "int8")
        shardings = quantize.shardings(shardings, params)
    params = jax.tree_util.tree_map(lambda a, sh: sds(a.shape, a.dtype, sharding=sh), params, shardings)
    cache_shape = (cfg.llm.depth, b, cfg.llm.num_kv_heads, s, cfg.llm.head_dim)
    cache = {k: sds(cache_shape, jnp.dtype(cfg.dtype), sharding=cache_sharding(mesh, rules)) for k in ("k", "v")}
    rows, table = batch_sharding(mesh, 1, rules), batch_sharding(mesh, 2, rules)
    args = (
        params,
        sds((b,), jnp.int32, sharding=rows),
        cache,
        sds((b, s), jnp.int32, sharding=table),
        sds((b,), jnp.int32, sharding=rows),
        sds((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec())),
    )
    model = ZiyaVisual(cfg)
    step = jax.jit(
        lambda p, tokens, c, key_mask, positions, slot: _step(model, p, tokens, c, key_mask, positions, slot),
        donate_argnums=2,
    )
    program = {"": "decode_step", "bfloat16": "decode_step_bf16", "int8": "decode_step_int8"}[weights]
    return _result(program, topo, mesh, b, "-", *_compile(step, args, mesh, rules))


def llama_step(cfg, depth: int, batch: int, text_len: int, mesh, rules):
    """(jitted forward + backward of the model's LLaMA alone at `depth` layers, all parameters trained; its
    abstract arguments), to show that scanned layers keep the compile time flat in depth."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from ziya_jax.model.llama import Llama
    from ziya_jax.sharding import batch_sharding
    from ziya_jax.train.losses import cross_entropy

    llm = dataclasses.replace(cfg.llm, depth=depth)
    module = Llama(llm, cfg.lora, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype), cfg.remat_policy)
    sds = jax.ShapeDtypeStruct
    embeds = sds((batch, text_len, llm.width), jnp.dtype(cfg.dtype), sharding=batch_sharding(mesh, 3, rules))
    ids = sds((batch, text_len), jnp.int32, sharding=batch_sharding(mesh, 2, rules))
    boxed = jax.eval_shape(lambda e, i: module.init(jax.random.key(0), e, i, i)["params"], embeds, ids)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, list(rules))
    params = jax.tree_util.tree_map(lambda a, sh: sds(a.shape, a.dtype, sharding=sh), nn.meta.unbox(boxed), shardings)

    def loss(p, e, labels):
        logits, _ = module.apply({"params": p}, e, labels, labels)
        return cross_entropy(logits, labels)

    return jax.jit(jax.value_and_grad(loss), out_shardings=(None, shardings)), (params, embeds, ids)


def compile_llama(
    config, topo: Topology, devices, depth: int, batch_size=None, remat=None, mesh=None, dcn=None, rows_per_shard=None
) -> Result:
    cfg, mesh, rules, data = setup(config, devices, batch_size, remat, mesh, dcn, rows_per_shard)
    _require(config, "data", "batch_size, text_len")
    step, args = llama_step(cfg, depth, data.batch_size, data.text_len, mesh, rules)
    return _result(
        f"llama_{depth}_layers", topo, mesh, data.batch_size, cfg.remat_policy, *_compile(step, args, mesh, rules)
    )


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def table(results: list[Result]) -> str:
    """The results as a markdown table."""
    rows = [
        "| program | topology | chips | mesh (data, fsdp, tensor) | batch | remat | arguments GiB | "
        "temporaries GiB | total GiB / HBM | fits | TFLOP per chip | roofline |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mesh = "x".join(str(v) for v in r.mesh.values())
        total = f"{r.total_gib:.2f} / {r.hbm_gib:.0f}" if r.total_gib else f"- / {r.hbm_gib:.0f}"
        roofline = f"{r.roofline_s * 1e3:.0f} ms ({r.bound})" if r.roofline_s else "-"
        rows.append(
            f"| {r.program} | {r.topology} | {r.chips} | {mesh} | {r.batch} | {r.remat} | "
            f"{r.argument_gib:.2f} | {r.temp_gib:.2f} | {total} | {'yes' if r.fits else 'no'} | "
            f"{r.flops_per_chip / 1e12:.1f} | {roofline} |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ziya_jax.compile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="configs/FILE.py[:arg]")
    parser.add_argument("--topology", required=True, help="one or more, comma-separated: v5e-64,v6e-16,...")
    parser.add_argument("--num-slices", type=int, default=1, help="slices of the topology (multi-slice, DCN)")
    parser.add_argument(
        "--smallest",
        action="store_true",
        help="try the topologies in the order given and stop at the first where everything fits",
    )
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", type=int, help="global train batch (default: the config's data.batch_size)")
    batch.add_argument(
        "--rows-per-chip",
        type=int,
        help="instead: this many rows per batch shard (per chip when tensor is 1), so the batch follows the topology",
    )
    parser.add_argument("--remat", help="remat policy: none | full | dots | dots_no_batch (default: the config's)")
    parser.add_argument(
        "--mesh", type=_ints, help="ICI mesh data,fsdp,tensor, e.g. --mesh=1,-1,1 (default: the config's)"
    )
    parser.add_argument("--dcn", type=_ints, help="DCN mesh across slices, e.g. --dcn=-1,1,1 (default: the config's)")
    parser.add_argument("--programs", default="train,decode", help="train, decode or both (comma-separated)")
    parser.add_argument("--decode-batch", type=int, help="decode rows (default: one per batch shard)")
    parser.add_argument("--decode-len", type=int, help="KV cache slots (default: the LLM's maximum positions)")
    parser.add_argument(
        "--quantize",
        choices=("", "none", "int8"),
        default="",
        help="int8: compile the decode step with bfloat16 weights and with them quantised to int8",
    )
    parser.add_argument(
        "--llm-depths",
        type=_ints,
        help="instead: compile the LLaMA stack alone at these depths and compare compile times",
    )
    args = parser.parse_args(argv)
    if (args.batch_size or 1) < 1 or (args.rows_per_chip or 1) < 1:
        parser.error("--batch-size and --rows-per-chip must be positive")
    programs = args.programs.split(",")
    if not programs or set(programs) - {"train", "decode"}:
        parser.error(f"--programs {args.programs!r}: choose from train, decode")

    import jax

    jax.config.update("jax_platforms", "cpu")  # the host compiles; TPU devices come from the topology alone
    from ziya_jax.config import load_config

    results, fitted = [], False
    try:
        config = load_config(args.config)
        for name in args.topology.split(","):
            topo = parse_topology(name, args.num_slices)
            devices = topology_devices(topo)
            common = dict(mesh=args.mesh, dcn=args.dcn)
            train = dict(common, rows_per_shard=args.rows_per_chip)
            if args.llm_depths:
                runs = [
                    functools.partial(compile_llama, config, topo, devices, d, args.batch_size, args.remat, **train)
                    for d in args.llm_depths
                ]
            else:
                step = functools.partial(
                    compile_train_step, config, topo, devices, args.batch_size, args.remat, **train
                )
                decode = functools.partial(
                    compile_decode_step, config, topo, devices, args.decode_batch, args.decode_len, **common
                )
                decodes = (
                    [decode]
                    if args.quantize in ("", "none")
                    else [
                        functools.partial(decode, weights="bfloat16"),
                        functools.partial(decode, weights=args.quantize),
                    ]
                )
                runs = [r for p in programs for r in ([step] if p == "train" else decodes)]
            here = []
            for run in runs:
                here.append(run())
                print(here[-1].line(), flush=True)
            results += here
            if args.llm_depths:
                print(
                    f"compile time {here[-1].program} / {here[0].program} on {name}: "
                    f"{here[-1].compile_s / here[0].compile_s:.2f}x"
                )
            fitted = all(r.fits for r in here)
            if args.smallest and fitted:
                break
    except jax.errors.JaxRuntimeError as e:  # before RuntimeError, which it is
        print(f"error: compilation failed: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(results))
    print(json.dumps([dataclasses.asdict(r) for r in results]))
    if args.smallest and not fitted:
        print(f"error: nothing fits on any of {args.topology}", file=sys.stderr)
        return 1
    misfits = [f"{r.program} on {r.topology}: {r.error}" for r in results if not r.fits]
    if misfits and not args.smallest:
        print("error: does not fit: " + "; ".join(misfits), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
