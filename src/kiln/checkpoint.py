"""The one place kiln talks to orbax: save and restore train state plus data-iterator state.

A checkpoint at `<workdir>/checkpoints/<step>/` holds two items: `state` (params, optimizer
state, step, rng as global jax.Arrays) and `data_iter` (the grain iterator's position, one file
per process). Saves are asynchronous and committed atomically, so a crash mid-save leaves the
previous checkpoint as the latest good one.
"""

import json
import os
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from kiln.errors import KilnError


class Checkpointer:
    """Keeps the last `keep` checkpoints plus every `keep_every`-th step (0 = none extra)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int = 3,
        keep_every: int = 0,
        async_save: bool = True,
    ) -> None:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_every or None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data_iter")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any | None = None) -> None:
        """Starts saving `state` (and the iterator position) at `step`; returns before it ends."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Any:
        """Restores onto the shardings in `abstract_state` (any mesh, any process count);
        rewinds `data_iter` (see `_restore_iterator`)."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
            if data_iter is not None:
                self._restore_iterator(step, data_iter)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise KilnError(
                f"Could not restore checkpoint step {step} from {self.directory}: {e}. The"
                " checkpoint does not match this run's model/optimizer/data config; start in a"
                " new workdir or restore the config the checkpoint was written with."
            ) from e
        return restored["state"]

    def _restore_iterator(self, step: int, data_iter: Any) -> None:
        """Sets `data_iter` to the saved position. grain writes one file per process; every
        process of a kiln run holds the same position (the next batch's index), so a run with
        another process count reads the first file."""
        folder = pathlib.Path(self.directory, str(step), "data_iter")
        own = folder / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        files = [own] if own.exists() else sorted(folder.glob("process_*-of-*.json"))
        if not files:
            raise FileNotFoundError(f"no iterator state in {folder}")
        state = json.loads(files[0].read_text())
        if "streams" in state:
            raise KilnError(
                f"Checkpoint step {step} in {self.directory} holds a data position of the"
                " packing streams of kiln before its batch-order change; this kiln cannot"
                " continue that order. Start a new workdir, or fine-tune from this run with"
                " init_from.workdir (parameters carry over)."
            )
        data_iter.set_state(state)

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the `state.params` leaves present in `abstract_params` (a nested dict of
        ShapeDtypeStructs with target shardings), onto those shardings; the rest is not read."""
        item = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        )
        restored = self._manager.restore(step, args=ocp.args.Composite(state=args))
        return restored["state"]["params"]

    def restore_raw(self, step: int) -> Any:
        """The saved state tree as stored (dicts of arrays), for inspection and tests."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
        )
        return restored["state"]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with target shardings: what `restore` needs to place arrays anywhere."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
