"""Training-engine benchmark: Ray Train + DeepSpeed against a plain torch DDP loop, and ZeRO memory.

    python jobs/bench_train.py                          # CPU: vlmo_small stage-3 task, 2 workers, ZeRO 0/2/3 vs DDP
    python jobs/bench_train.py --zero 0 3 --steps 20 --batch 16
    python jobs/bench_train.py --gpu                    # GPU: vlmo_base stage 3, bf16, samples/s + MFU

Both sides train the same task (VLMo stage 3: ITC + ITM with hard negatives + 0.25 MLM),
same model, per-worker batch, worker count, optimizer (AdamW over trainable params) and
the same synthetic batches (seeded per rank and step, generated in memory so that the data
pipeline is out of the comparison). Each side warms up ``--warmup`` steps (engine start-up,
op compilation and first-step allocation are outside the timing), then times ``--steps``
optimizer steps between two barriers; samples/s = steps * batch * workers / seconds.
Both use one intra-op thread per worker (Ray gives each 1-CPU worker OMP_NUM_THREADS=1).

Memory per rank = bytes of distinct tensor storages held for the model and optimizer,
counted after a warm step: module parameters (under ZeRO-3 only the rank's partitions,
``ds_tensor``), the optimizer's fp32 master partitions, gradient partitions
(``.grad`` of module params and master partitions, and DeepSpeed's ``averaged_gradients``,
counted right after ``backward``) and the optimizer state (Adam moments). Communication
buckets and activations are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

STAGE3 = {"itc": 1.0, "itm": 1.0, "mlm": 0.25}


def synthetic_batch(model_cfg, batch: int, seed: int, device="cpu"):
    import torch

    g = torch.Generator().manual_seed(seed)
    T = model_cfg.max_text_len
    ids = torch.randint(1000, 8000, (batch, T), generator=g)
    ids[:, 0] = 101
    lengths = torch.randint(T // 2, T + 1, (batch,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # [B, T]
    ids = ids * mask
    out = {
        "pixel_values": torch.randn(batch, 3, model_cfg.img_size, model_cfg.img_size, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "sample_id": torch.arange(batch) + seed * batch,
    }
    return {k: v.to(device) for k, v in out.items()}


def _storage_bytes(tensors, seen: set) -> int:
    total = 0
    for t in tensors:
        if t is None or not hasattr(t, "untyped_storage") or t.numel() == 0:
            continue
        s = t.untyped_storage()
        key = (s.data_ptr(), s.nbytes())
        if key not in seen:
            seen.add(key)
            total += s.nbytes()
    return total


def engine_memory(engine, grads_after_backward: int) -> dict[str, int]:
    """Params / optimizer-state bytes held by this rank (distinct storages), plus the grad bytes counted earlier."""
    seen: set = set()
    params = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    opt = engine.optimizer
    basic = getattr(opt, "optimizer", opt)
    masters = [p for g in basic.param_groups for p in g["params"]]
    p_bytes = _storage_bytes(params, seen) + _storage_bytes(masters, seen)
    state = [v for st in basic.state.values() for v in st.values() if hasattr(v, "untyped_storage")]
    s_bytes = _storage_bytes(state, set())
    return {
        "params": p_bytes,
        "grads": grads_after_backward,
        "optimizer_state": s_bytes,
        "total": p_bytes + grads_after_backward + s_bytes,
    }


def grad_bytes(engine) -> int:
    seen: set = set()
    grads = [p.grad for p in engine.module.parameters()]
    basic = getattr(engine.optimizer, "optimizer", engine.optimizer)
    grads += [p.grad for g in basic.param_groups for p in g["params"]]
    avg = getattr(engine.optimizer, "averaged_gradients", None)
    if isinstance(avg, dict):
        for v in avg.values():
            grads += list(v) if isinstance(v, (list, tuple)) else [v]
    return _storage_bytes(grads, seen)


# ----------------------------------------------------------------------------- Ray Train + DeepSpeed


def ray_worker(config: dict) -> None:
    from vlforge.train.engine import prepare_env

    prepare_env(config["gpu"])
    import ray.train
    import torch
    import torch.distributed as dist

    if not config["gpu"]:
        torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(ctx.get_local_rank()))
    import deepspeed  # noqa: F401

    from vlforge.config import DeepSpeedConfig, StageConfig
    from vlforge.models import create_model
    from vlforge.tasks.vlmo import VLMoPretrainTask
    from vlforge.train.engine import build_engine

    device = torch.device("cuda", torch.cuda.current_device()) if config["gpu"] else torch.device("cpu")
    torch.manual_seed(0)
    model = create_model(config["model"])
    task = VLMoPretrainTask(model, STAGE3).to(device)
    steps = config["warmup"] + config["steps"]
    stage = StageConfig(name="bench", objectives=STAGE3, steps=steps + 1)
    ds = DeepSpeedConfig(zero_stage=config["zero"], precision="bf16" if config["gpu"] else "fp32", clip_grad=1.0)
    engine = build_engine(task, stage, ds, micro_batch=config["batch"], world_size=world, on_gpu=config["gpu"])
    bf16 = config["gpu"]
    flops = None
    t0 = None
    mem = {}
    for i in range(steps):
        if i == config["warmup"]:
            dist.barrier()
            if config["gpu"]:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        batch = synthetic_batch(model.config, config["batch"], seed=1000 * i + rank, device=device)
        if bf16:
            batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
        if i == 1 and config["gpu"]:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as fc:
                loss = engine(batch)["loss"]
                engine.backward(loss)
            flops = fc.get_total_flops()
        else:
            loss = engine(batch)["loss"]
            engine.backward(loss)
        if i == 1:
            g = grad_bytes(engine)
        engine.step()
        if i == 1:
            mem = engine_memory(engine, g)
    dist.barrier()
    if config["gpu"]:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {
        "rank": rank,
        "seconds": seconds,
        "samples_per_s": config["steps"] * config["batch"] * world / seconds,
        "memory": mem,
        "flops_per_step_rank": flops,
        "loss": float(loss),
    }
    if config["gpu"]:
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    Path(config["out"], f"ray_z{config['zero']}_rank{rank}.json").write_text(json.dumps(out))
    ray.train.report({"done": 1})


def run_ray(args, zero: int, out: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    res = {"CPU": 1, **({"GPU": 1} if args.gpu else {})}
    trainer = TorchTrainer(
        ray_worker,
        train_loop_config={
            "model": args.model,
            "batch": args.batch,
            "warmup": args.warmup,
            "steps": args.steps,
            "zero": zero,
            "gpu": args.gpu,
            "out": out,
        },
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpu, resources_per_worker=res),
        torch_config=TorchConfig(backend="nccl" if args.gpu else "gloo"),
        run_config=RunConfig(name=f"bench-train-{uuid.uuid4().hex[:8]}", storage_path=os.path.abspath(args.storage)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return [json.loads(Path(out, f"ray_z{zero}_rank{r}.json").read_text()) for r in range(args.workers)]


# ----------------------------------------------------------------------------- plain torch DDP


def ddp_worker(rank: int, world: int, port: int, args_dict: dict, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from vlforge.models import create_model
    from vlforge.models.trainable import param_groups
    from vlforge.tasks.vlmo import VLMoPretrainTask

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = create_model(args_dict["model"])
    task = VLMoPretrainTask(model, STAGE3)
    ddp = DDP(task, find_unused_parameters=True)
    opt = torch.optim.AdamW(param_groups(task, 0.01), lr=1e-4, betas=(0.9, 0.98))
    steps = args_dict["warmup"] + args_dict["steps"]
    t0 = None
    for i in range(steps):
        if i == args_dict["warmup"]:
            dist.barrier()
            t0 = time.perf_counter()
        batch = synthetic_batch(model.config, args_dict["batch"], seed=1000 * i + rank)
        loss = ddp(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), 1.0)
        opt.step()
    dist.barrier()
    seconds = time.perf_counter() - t0
    Path(out, f"ddp_rank{rank}.json").write_text(
        json.dumps(
            {
                "rank": rank,
                "seconds": seconds,
                "samples_per_s": args_dict["steps"] * args_dict["batch"] * world / seconds,
            }
        )
    )
    dist.destroy_process_group()


def run_ddp(args, out: str) -> list[dict]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_worker, args=(args.workers, port, vars(args), out), nprocs=args.workers, join=True)
    return [json.loads(Path(out, f"ddp_rank{r}.json").read_text()) for r in range(args.workers)]


def _mib(n: int) -> str:
    return f"{n / 2**20:8.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="default: vlmo_small (CPU) / vlmo_base (--gpu)")
    p.add_argument("--batch", type=int, default=None, help="per-worker batch; default 16 (CPU) / 64 (--gpu)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--zero", type=int, nargs="+", default=[0, 2, 3])
    p.add_argument("--gpu", action="store_true", help="GPU path: bf16, NCCL, samples/s and MFU (no DDP baseline)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per-GPU dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--no-ddp", action="store_true")
    p.add_argument("--storage", default="out/bench_train")
    args = p.parse_args(argv)
    args.model = args.model or ("vlmo_base" if args.gpu else "vlmo_small")
    args.batch = args.batch or (64 if args.gpu else 16)

    from vlforge.runtime import init_ray

    init_ray(num_train_workers=args.workers, log_to_driver=False)
    out = tempfile.mkdtemp(prefix="bench-train-")
    print(
        f"model {args.model}, task VLMo stage 3 (itc + itm + 0.25 mlm), {args.workers} workers x batch "
        f"{args.batch}, warm-up {args.warmup}, timed {args.steps} steps, {'GPU bf16' if args.gpu else 'CPU fp32'}"
    )
    ray_results = {}
    for z in args.zero:
        t0 = time.perf_counter()
        ray_results[z] = run_ray(args, z, out)
        print(
            f"  Ray Train + DeepSpeed ZeRO-{z}: {ray_results[z][0]['samples_per_s']:.2f} samples/s "
            f"(run incl. start-up {time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
    ddp = None
    if not args.gpu and not args.no_ddp:
        ddp = run_ddp(args, out)
        print(f"  plain torch DDP (mp.spawn, gloo):  {ddp[0]['samples_per_s']:.2f} samples/s", flush=True)

    print("\nthroughput (samples/s, all workers)")
    for z, rs in ray_results.items():
        line = f"  ZeRO-{z}: {rs[0]['samples_per_s']:8.2f}"
        if ddp:
            line += f"   ratio vs DDP {rs[0]['samples_per_s'] / ddp[0]['samples_per_s']:.3f}"
        if args.gpu and rs[0].get("flops_per_step_rank"):
            achieved = rs[0]["flops_per_step_rank"] * args.steps / rs[0]["seconds"]
            line += f"   MFU {achieved / (args.peak_tflops * 1e12):.3f} ({achieved / 1e12:.1f} TFLOP/s per GPU)"
        print(line)
    if ddp:
        print(f"  DDP:    {ddp[0]['samples_per_s']:8.2f}")
    print("\nper-rank model + optimizer memory (MiB): params  grads  optimizer-state  total")
    for z, rs in ray_results.items():
        for r in rs:
            m = r["memory"]
            print(
                f"  ZeRO-{z} rank {r['rank']}: {_mib(m['params'])} {_mib(m['grads'])} {_mib(m['optimizer_state'])} "
                f"{_mib(m['total'])}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
