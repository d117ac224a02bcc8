"""The one place kiln talks to orbax: save and restore train state plus data-iterator state.

A checkpoint at `<workdir>/checkpoints/<step>/` holds two items: `state` (params, optimizer
state, step, rng as global jax.Arrays) and `data_iter` (the grain iterator's position, one file
per process), plus kiln's record (`integrity.RECORD`: every file's checksum and the loop's
state). Saves are asynchronous and committed atomically (the record is written before the
commit), so a crash mid-save leaves the previous checkpoint as the latest good one. A failed save
is one KilnError naming the step, the reason and the free space, raised by `poll` (soon after)
or `wait`/`save` (at the latest); the checkpoints before it stay. Every restore verifies the
checksums first; `restore_latest` falls back past damaged checkpoints, setting them aside.
"""

import glob
import json
import os
import pathlib
import shutil
from collections.abc import Callable
from typing import Any, NamedTuple

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from kiln import integrity
from kiln.errors import KilnError

Log = Callable[[str], None]


class _Protected(NamedTuple):  # orbax preservation policy: the steps in a set kept.
    steps: set[int]

    def should_preserve(self, checkpoints: Any, *, context: Any) -> list[bool]:
        return [c.step in self.steps for c in checkpoints]


class Checkpointer:
    """Keeps the last `keep` checkpoints plus every `keep_every`-th step (0 = none extra), plus
    the steps given to `protect` (a run's best validation checkpoint)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int = 3,
        keep_every: int = 0,
        async_save: bool = True,
    ) -> None:
        integrity.quiet_orbax_errors()
        self._protected: set[int] = set()
        keeps = [ocp.checkpoint_managers.LatestN(n=keep), _Protected(self._protected)]
        if keep_every:
            keeps.append(ocp.checkpoint_managers.preservation_policy.EveryNSteps(keep_every))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(keeps),
            enable_async_checkpointing=True,  # Also for async_save=False: `save` then waits.
            create=True,
            async_options=ocp.AsyncOptions(
                post_finalization_callback=self._write_record,
                # Folders made before `save` returns: an unwritable folder fails right there,
                # not in threads that then wait minutes for folders that never come.
                create_directories_asynchronously=False,
            ),
        )
        self.directory = os.path.abspath(directory)
        self._async = async_save
        self._pending: tuple[int, dict] | None = None  # (step, loop state) of the save in flight
        self._failed: KilnError | None = None
        self._verified: dict[int, tuple] = {}  # step -> file signature when it last checked ok
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=("state", "data_iter")
            )
        except (OSError, ValueError) as e:
            raise KilnError(
                f"Cannot use {self.directory} for checkpoints: {integrity.describe_io_error(e)}."
                " Make the workdir writable (or choose another --workdir) and re-run."
            ) from None

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def protect(self, steps: set[int]) -> None:
        """From the next save on, keeps `steps` (only these) whatever `keep` says."""
        self._protected.clear()
        self._protected.update(steps)

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    # -- Saving ---------------------------------------------------------------------------

    def save(
        self, step: int, state: Any, data_iter: Any | None = None, loop: dict | None = None
    ) -> None:
        """Starts saving `state` (and the iterator position, and `loop`: kiln's loop state,
        read back with `loop_state`) at `step`; returns before it ends unless `async_save` is
        off. A failure of the previous save is raised here, before this one starts."""
        self.wait()
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self._pending = (step, dict(loop or {}))
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # orbax raises whatever its writers raised.
            raise self._save_failed(e) from None
        if not self._async:
            self.wait()

    def _write_record(self) -> None:
        """orbax's post-finalization callback (process 0, all processes' files written, before
        the commit): the checksums and loop state, inside the folder about to be committed."""
        if self._pending is None:
            return
        step, loop = self._pending
        integrity.write_record(integrity.staging_folder(self.directory, step), step, loop)

    def poll(self) -> None:
        """Raises the KilnError of a failed asynchronous save as soon as it has ended, without
        waiting for one in progress (every process polls alike only with one process; with
        several, a failure surfaces at the next `save` or `wait`)."""
        if self._pending is None or jax.process_count() > 1:
            return
        if not self._manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed; a KilnError if one failed."""
        if self._failed is not None:
            raise self._failed
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(e) from None
        self._pending = None

    def _save_failed(self, error: BaseException) -> KilnError:
        """The one-paragraph error of a failed save; removes its partial folder (its space)."""
        step = self._pending[0] if self._pending else "?"
        self._pending = None
        self.remove_partial(step)
        try:
            self._manager.reload()
            kept = sorted(self._manager.all_steps())
        except Exception:  # The folder may be unreadable too; the message still holds.
            kept = []
        intact = (
            f"the checkpoints written before it (steps {kept}) are intact"
            if kept
            else "no checkpoint had been written before it"
        )
        resume = f" from step {kept[-1]}" if kept else ""
        self._failed = KilnError(
            f"Saving checkpoint step {step} to {self.directory} failed:"
            f" {integrity.describe_io_error(error)} ({integrity.free_space(self.directory)})."
            f" The run stopped at this save; {intact}. Free space or fix the folder's"
            f" permissions, then re-run the same command to resume{resume}."
        )
        return self._failed

    def remove_partial(self, step: int | str = "") -> None:
        """Deletes the temporary folders of unfinished saves (of `step`, or all): space a
        failed or killed save used. Only for a workdir no other process is saving into."""
        if jax.process_index() == 0:
            pattern = os.path.join(self.directory, f"{step or '[0-9]*'}{integrity.TMP}*")
            for partial in glob.glob(pattern):
                shutil.rmtree(partial, ignore_errors=True)

    # -- Integrity --------------------------------------------------------------------------

    def step_folder(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def check(self, step: int) -> str | None:
        """Why checkpoint `step` cannot be trusted (`integrity.check`), or None if intact; the
        same answer on every process (process 0 reads the files)."""
        folder = self.step_folder(step)
        problem = None
        if jax.process_index() == 0:
            signature = integrity.signature(folder)
            if self._verified.get(step) != signature:
                problem = integrity.check(folder)
                if problem is None:
                    self._verified[step] = signature
        if jax.process_count() > 1:
            bad = multihost_utils.broadcast_one_to_all(np.int32(problem is not None))
            if bad and problem is None:
                problem = "process 0 found it damaged (see its log)"
        return problem

    def loop_state(self, step: int) -> dict[str, Any]:
        """The `loop` dict saved with checkpoint `step` ({} for a checkpoint without one)."""
        return integrity.loop_state(self.step_folder(step))

    def set_aside(self, step: int, why: str) -> str:
        """Moves checkpoint `step` to `<step>.<why>` (process 0) so no run restores it."""
        self.wait()
        path = os.path.join(self.directory, f"{step}.{why}")
        if jax.process_index() == 0:
            try:
                path = integrity.set_aside(self.directory, step, why)
            except OSError as e:
                raise KilnError(
                    f"Checkpoint step {step} in {self.directory} must be moved aside ({why}) but"
                    f" cannot be: {integrity.describe_io_error(e)}. Delete or move"
                    f" {self.step_folder(step)} by hand, then re-run."
                ) from None
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"kiln_set_aside_{step}")
        self._manager.reload()
        self._verified.pop(step, None)
        return path

    def _damaged(self, step: int, problem: str) -> KilnError:
        return KilnError(
            f"Checkpoint step {step} in {self.directory} is damaged: {problem}. Restoring it"
            " would load wrong values. Start from another step, or check the disk."
        )

    # -- Restoring --------------------------------------------------------------------------

    def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Any:
        """Restores onto the shardings in `abstract_state` (any mesh, any process count);
        rewinds `data_iter` (see `_restore_iterator`). A KilnError if `step` is damaged."""
        problem = self.check(step)
        if problem is not None:
            raise self._damaged(step, problem)
        return self._restore(step, abstract_state, data_iter, verified=True)

    def _restore(self, step: int, abstract_state: Any, data_iter: Any, verified: bool) -> Any:
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
            if data_iter is not None:
                self._restore_iterator(step, data_iter)
        except KilnError:
            raise
        except (ValueError, KeyError, FileNotFoundError) as e:
            if not verified:
                raise _Unreadable(integrity.first_line(e)) from None
            raise KilnError(
                f"Could not restore checkpoint step {step} from {self.directory}: {e}. Its files"
                " are intact, so it does not match this run's model/optimizer/data config; start"
                " in a new workdir or restore the config the checkpoint was written with."
            ) from None
        except Exception as e:  # tensorstore's read errors are plain Exceptions.
            if not verified:
                raise _Unreadable(integrity.first_line(e)) from None
            raise KilnError(
                f"Could not read checkpoint step {step} from {self.directory} although its"
                f" checksums match: {integrity.first_line(e)}. Check the disk and re-run."
            ) from None
        return restored["state"]

    def restore_latest(
        self, abstract_state: Any, data_iter: Any | None = None, log: Log = print
    ) -> tuple[int, Any] | None:
        """(step, state) of the newest intact checkpoint, or None if there is none at all. A
        damaged one (checksums, unreadable, non-finite parameters) is logged, set aside as
        `<step>.damaged` and the next older tried; a KilnError if none is intact."""
        self.remove_partial()  # Unfinished saves of a run that died; this run holds the lock.
        damaged = []
        for step in sorted(self.all_steps(), reverse=True):
            problem = self.check(step)
            if problem is None:
                verified = os.path.exists(os.path.join(self.step_folder(step), integrity.RECORD))
                try:
                    state = self._restore(step, abstract_state, data_iter, verified)
                    problem = _non_finite(state)
                except _Unreadable as e:
                    problem = f"orbax cannot read it ({e})"
                if problem is None:
                    if damaged:
                        log(f"Restore: fell back to checkpoint step {step}, the newest intact one.")
                    return step, state
            path = self.set_aside(step, integrity.DAMAGED)
            log(
                f"Restore: checkpoint step {step} in {self.directory} is damaged: {problem}. It"
                f" was moved to {path} (not deleted) and is not used; trying the one before it."
            )
            damaged.append(step)
        if not damaged:
            return None
        raise KilnError(
            f"No intact checkpoint in {self.directory}: steps {damaged} are all damaged (each is"
            " described above and was moved aside as <step>.damaged). Restore the checkpoints"
            " from a backup, or start the run again in a new workdir."
        )

    def newest_intact(self, log: Log = print) -> int | None:
        """The newest step that passes `check` (damaged ones are logged, left in place: this
        may be another run's folder); None if there is none."""
        for step in sorted(self.all_steps(), reverse=True):
            problem = self.check(step)
            if problem is None:
                return step
            log(f"Checkpoint step {step} in {self.directory} is damaged ({problem}); skipped.")
        return None

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
        ShapeDtypeStructs with target shardings), onto those shardings; the rest is not read.
        A KilnError if checkpoint `step` is damaged."""
        problem = self.check(step)
        if problem is not None:
            raise self._damaged(step, problem)
        item = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        )
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(state=args))
        except Exception as e:  # orbax's and tensorstore's errors, whatever their type.
            raise KilnError(
                f"Could not read the parameters of checkpoint step {step} in {self.directory}:"
                f" {integrity.first_line(e)}. Check that it is a run of this model (its"
                " config.json), and the disk (python -m kiln.tools.checkpoints --verify)."
            ) from None
        return restored["state"]["params"]

    def param_shapes(self, step: int) -> dict[str, jax.ShapeDtypeStruct]:
        """ "/"-joined path -> shape and dtype of each `state.params` leaf of checkpoint `step`,
        from orbax's metadata (no array is read)."""
        folder = epath.Path(self.step_folder(step)) / "state"
        tree = ocp.PyTreeCheckpointHandler().metadata(folder).tree
        leaves = jax.tree_util.tree_leaves_with_path(tree["params"])
        return {
            "/".join(str(k.key) for k in keys): jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
            for keys, leaf in leaves
        }

    def restore_raw(self, step: int) -> Any:
        """The saved state tree as stored (dicts of arrays), for inspection and tests."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
        )
        return restored["state"]

    def close(self) -> None:
        """Waits for a save in flight (raising its failure, unless already raised) and closes."""
        reported = self._failed is not None
        error = None
        try:
            self.wait()
        except KilnError as e:
            error = None if reported else e
        try:
            self._manager.close()
        except Exception:  # After a failed save orbax re-raises it; that one is reported.
            if self._failed is None:
                raise
        if error is not None:
            raise error


class _Unreadable(Exception):
    """orbax could not read a checkpoint that has no checksum record to tell damage apart."""


def _non_finite(state: Any) -> str | None:
    """Why a restored state cannot be the one kiln saved (it never saves non-finite
    parameters), or None."""
    params = state["params"] if isinstance(state, dict) else state.params
    return None if bool(_all_finite(params)) else "its parameters hold NaN or Inf values"


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jax.tree.reduce(lambda ok, x: ok & jax.numpy.isfinite(x).all(), tree, True)


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with target shardings: what `restore` needs to place arrays anywhere."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
