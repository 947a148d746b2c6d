"""Device mesh and shardings: one `data` axis over every device of every host.

Training state is replicated, batches are sharded along their leading axis.
Each process supplies only the rows of the global batch that its own devices
hold (`process_rows`), and `global_batch` assembles them into one global
jax.Array, so the same code runs on 1 CPU, 8 GPUs or a multi-host TPU slice.
Inference over many volumes (encoding, decoding, segmenting, features) runs a
per-stack function vmapped over volumes, in device-sharded chunks (`map_stacks`).
"""

import functools

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from slicevae_jax.errors import ConfigError

DATA = "data"


def initialize_distributed(dist) -> None:
  """Starts JAX's multi-host runtime when `dist.initialize` (config group `dist`).

  Empty coordinator / -1 counts let JAX detect them (Cloud TPU, SLURM, Open MPI);
  the local launcher (launch/local.sh) passes them explicitly.
  """
  if dist.initialize:
    kwargs = {}
    if dist.coordinator_address:
      kwargs["coordinator_address"] = dist.coordinator_address
    if dist.num_processes > 0:
      kwargs["num_processes"] = int(dist.num_processes)
    if dist.process_id >= 0:
      kwargs["process_id"] = int(dist.process_id)
    if dist.cpu_collectives:  # only the CPU backend reads it
      jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
    jax.distributed.initialize(**kwargs)
  logging.info("process %d of %d; %d local / %d global devices (%s)",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh named 'data' over the first `num_devices` devices (default: all)."""
  devices = jax.devices()
  if num_devices is not None:
    if num_devices > len(devices):
      raise ConfigError(f"asked for {num_devices} devices, only {len(devices)} present")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def sharded(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the data axis."""
  return NamedSharding(mesh, P(DATA))


def check_batch(global_batch: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if global_batch % n:
    raise ConfigError(
        f"config key 'train.batch_size' is {global_batch}, which does not divide over "
        f"{n} devices; use a multiple of {n}")


@functools.lru_cache(maxsize=32)
def _process_rows(mesh: Mesh, global_batch: int) -> tuple[int, ...]:
  index_map = sharded(mesh).addressable_devices_indices_map((global_batch,))
  rows = set()
  for index in index_map.values():
    rows.update(range(*index[0].indices(global_batch)))
  return tuple(sorted(rows))


def process_rows(mesh: Mesh, global_batch: int) -> np.ndarray:
  """Rows of a global batch held by this process's devices, in order."""
  return np.asarray(_process_rows(mesh, global_batch), np.int64)


def global_batch(local: np.ndarray, mesh: Mesh, global_size: int) -> jax.Array:
  """Assembles this process's rows `local` [b, ...] into a global sharded array."""
  shape = (global_size,) + tuple(local.shape[1:])
  return jax.make_array_from_process_local_data(sharded(mesh), local, shape)


def replicate(tree, mesh: Mesh):
  """Places a host pytree on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def _pad_to(x: np.ndarray, n: int) -> np.ndarray:
  if len(x) == n:
    return x
  return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)])


def map_volumes(fn, inputs: np.ndarray, batch: int, mesh: Mesh) -> np.ndarray:
  """Applies a jitted per-chunk `fn` to [N, ...] in chunks sharded over devices.

  Chunks are padded to a multiple of the device count; results are trimmed.
  """
  n_dev = mesh.devices.size
  batch = max(n_dev, -(-batch // n_dev) * n_dev)
  outs = []
  for start in range(0, len(inputs), batch):
    chunk = inputs[start:start + batch]
    size = -(-len(chunk) // n_dev) * n_dev
    padded = _pad_to(chunk, size)
    local = process_rows(mesh, size)
    out = fn(global_batch(padded[local], mesh, size))
    outs.append(np.asarray(jax.device_get(_gather_fn(mesh)(out)))[:len(chunk)])
  return np.concatenate(outs)


@functools.lru_cache(maxsize=64)
def _vmapped_stack_fn(per_stack, static: tuple):
  fn = functools.partial(per_stack, *static) if static else per_stack
  return jax.jit(jax.vmap(fn, in_axes=(None, 0)))


@functools.lru_cache(maxsize=8)
def _gather_fn(mesh: Mesh):
  """Replicates a sharded result on every device, so every process can read it whole."""
  return jax.jit(lambda x: x, out_shardings=replicated(mesh))


def map_stacks(per_stack, variables, stacks: np.ndarray, batch: int, mesh: Mesh,
               static: tuple = ()) -> np.ndarray:
  """`per_stack(*static, variables, stack)` for every stack of [N, S, ...], vmapped over volumes.

  The one path from volumes to a network applied slice by slice: `per_stack` sees one
  volume's slices [S, ...] as a batch (so BatchNorm in 'volume' mode sees the stack) and
  returns [S, ...] or any per-volume array; chunks of `batch` volumes are sharded over
  the mesh (`map_volumes`). Returns the stacked results [N, ...] on the host.

  `per_stack` should be a module-level function and `static` hashable (a flax module, a
  shape): the jitted, vmapped function is cached on the pair, so repeated calls (a sample
  per call in a notebook, every chunk of an evaluation) reuse one compilation instead of
  tracing a fresh closure each time.
  """
  run = _vmapped_stack_fn(per_stack, tuple(static))
  return map_volumes(lambda x: run(variables, x), np.asarray(stacks), batch, mesh)
