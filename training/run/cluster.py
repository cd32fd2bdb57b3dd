"""What the launcher says about the job: torchrun and SLURM environments -> nodes, devices per
node and this process's global rank, so ``onegen train fit`` under either needs no
``trainer.devices`` / ``trainer.num_nodes`` of its own, and every process agrees on one run
name before Lightning starts the process group.

The rules are Lightning's own (``lightning.fabric.plugins.environments``), so the trainer this
builds always passes Lightning's checks of the same environment:

* torchrun (``TorchElasticEnvironment``, tried first, also inside a SLURM job): detected by
  ``TORCHELASTIC_RUN_ID``; Lightning requires ``devices x num_nodes == WORLD_SIZE``.
* SLURM (``SLURMEnvironment``): detected by ``SLURM_NTASKS`` unless the job is named ``bash``
  or ``interactive`` (an allocation's shell); more than one task needs
  ``--ntasks-per-node`` (``SLURM_NTASKS_PER_NODE``, one number), and Lightning requires
  ``devices == SLURM_NTASKS_PER_NODE`` and ``num_nodes == SLURM_NNODES``.

Anything else (Lightning launching the local processes itself) is no launcher: None.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from training.config import ConfigError

RUN_NAME_ENV = "ONEGEN_RUN_NAME"  # set by the first process for the ones it launches
SLURM_INTERACTIVE_NAMES = ("bash", "interactive")  # Lightning: not a SLURM-launched task


@dataclass(frozen=True)
class LaunchShape:
    launcher: str  # torchrun | slurm
    num_nodes: int
    devices: int  # processes per node
    rank: int  # this process's global rank
    job_id: str | None  # shared by every process of the job, when the launcher has one

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.devices


def _int(env: Mapping[str, str], key: str, launcher: str) -> int:
    try:
        return int(str(env[key]).strip())
    except KeyError:
        raise ConfigError(f"{launcher}: the environment variable {key} is missing") from None
    except ValueError:
        raise ConfigError(f"{launcher}: {key}={env[key]!r} is not an integer") from None


def _check_rank(launcher: str, key: str, rank: int, world: int) -> None:
    if not 0 <= rank < world:
        raise ConfigError(f"{launcher}: {key}={rank} is outside the world of {world} process(es)")


def _torchrun(env: Mapping[str, str]) -> LaunchShape:
    name = "torchrun"
    world, local = _int(env, "WORLD_SIZE", name), _int(env, "LOCAL_WORLD_SIZE", name)
    if world < 1 or local < 1:
        raise ConfigError(f"torchrun: WORLD_SIZE={world} LOCAL_WORLD_SIZE={local} must be >= 1")
    # GROUP_WORLD_SIZE: the number of agents (nodes) that joined the rendezvous.
    nodes = _int(env, "GROUP_WORLD_SIZE", name) if "GROUP_WORLD_SIZE" in env else world // local
    if nodes * local != world:
        raise ConfigError(
            f"torchrun: WORLD_SIZE={world} is not {nodes} node(s) x {local} process(es) "
            "(LOCAL_WORLD_SIZE): start every node with the same --nproc-per-node"
        )
    rank = _int(env, "RANK", name)
    _check_rank(name, "RANK", rank, world)
    run_id = env.get("TORCHELASTIC_RUN_ID") or "none"  # torchrun's default --rdzv-id
    return LaunchShape(name, nodes, local, rank, None if run_id == "none" else run_id)


def _slurm(env: Mapping[str, str]) -> LaunchShape:
    name = "SLURM"
    tasks = _int(env, "SLURM_NTASKS", name)
    nodes_key = next((k for k in ("SLURM_NNODES", "SLURM_JOB_NUM_NODES") if k in env), None)
    nodes = _int(env, nodes_key, name) if nodes_key else 1
    if tasks < 1 or nodes < 1:
        raise ConfigError(f"SLURM: SLURM_NTASKS={tasks} and {nodes} node(s) must be >= 1")
    raw = env.get("SLURM_NTASKS_PER_NODE")
    if raw is None:
        if tasks > 1:  # Lightning's SLURMEnvironment refuses it too (a RuntimeError)
            raise ConfigError(
                f"SLURM: {tasks} tasks without --ntasks-per-node; launch with "
                "--ntasks-per-node=<GPUs per node> (one task per GPU) so every node runs the "
                "same number of processes"
            )
        per_node = 1
    else:
        try:
            per_node = int(raw.strip())
        except ValueError:
            raise ConfigError(
                f"SLURM: SLURM_NTASKS_PER_NODE={raw!r} is not one number; Lightning needs the "
                "same --ntasks-per-node=<N> on every node"
            ) from None
    if per_node < 1 or nodes * per_node != tasks:
        raise ConfigError(
            f"SLURM: {tasks} tasks (SLURM_NTASKS) are not {nodes} node(s) x {per_node} task(s) "
            "per node: set --nodes, --ntasks-per-node and --ntasks so they agree"
        )
    rank = _int(env, "SLURM_PROCID", name)
    _check_rank(name, "SLURM_PROCID", rank, tasks)
    return LaunchShape("slurm", nodes, per_node, rank, env.get("SLURM_JOB_ID") or None)


def launch_shape(env: Mapping[str, str] | None = None) -> LaunchShape | None:
    """The torchrun or SLURM job this process belongs to, or None when started by hand
    (Lightning then launches the other local processes itself). ``ConfigError`` (one line)
    for an environment Lightning would refuse or hang on."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env:  # torch.distributed.is_torchelastic_launched()
        return _torchrun(env)
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in SLURM_INTERACTIVE_NAMES:
        return _slurm(env)
    return None


def global_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's rank before any process group exists: the launcher's, or for the
    processes Lightning launches itself ``NODE_RANK x devices + LOCAL_RANK`` (0 for the
    first process of the first node only; the main process of node n > 0, before it
    launches, is not 0 either)."""
    env = os.environ if env is None else env
    shape = launch_shape(env)
    if shape is not None:
        return shape.rank
    local = int(env.get("LOCAL_RANK") or 0)
    node = int(env.get("NODE_RANK") or env.get("GROUP_RANK") or 0)  # LightningEnvironment's
    per_node = int(env.get("LOCAL_WORLD_SIZE") or 0)
    return node * per_node + local if per_node else node + local


def agree(key: str, value: str, env: Mapping[str, str] | None = None) -> str:
    """Rank 0's ``value`` on every process of a torchrun job that has no shared run id,
    through the rendezvous store torchrun hosts at MASTER_ADDR:MASTER_PORT; ``value`` as it
    is everywhere else."""
    env = os.environ if env is None else env
    shape = launch_shape(env)
    if shape is None or shape.launcher != "torchrun" or shape.world_size == 1:
        return value
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        raise ConfigError(
            "torchrun without a rendezvous id or agent store: name the run (run_name=...) or "
            "pass --rdzv-id so every process writes to the same run folder"
        )
    from datetime import timedelta

    from torch.distributed import TCPStore

    store = TCPStore(
        env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timedelta(minutes=5)
    )
    name = f"onegen/{key}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if shape.rank == 0:
        store.set(name, value)
        return value
    return store.get(name).decode()
