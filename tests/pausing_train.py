"""`python -m launch.train`, held at a named point so that a test can SIGKILL it exactly there.

    TEST_PAUSE_AT=checkpoint/4 TEST_PAUSE_FILE=/tmp/paused python -m tests.pausing_train <launch.train flags>

Points (tests/test_reliability.py): `train_step/<k>/<s>` once step s of experience k is
dispatched (continual.Callbacks.after_step), `evaluation/<k>` and `solver/<k>`
(before_evaluation, before_solver), and `checkpoint/<step>` once Orbax has written every
item of that checkpoint into its tmp directory but not committed it (its finalize, wrapped
here; the thread that called `save` waits for it). At the point the process writes the
point's name into TEST_PAUSE_FILE and sleeps until killed. Everything else is the library's
own code: the pause lives here, not in gdjax.
"""

import functools
import os
import time

import orbax.checkpoint as ocp

from gdjax import checkpoint, continual

POINT = os.environ["TEST_PAUSE_AT"]
MARKER = os.environ["TEST_PAUSE_FILE"]


def pause(*where) -> None:
    if "/".join(map(str, where)) != POINT:
        return
    with open(f"{MARKER}.tmp", "w") as f:
        f.write(POINT)
    os.replace(f"{MARKER}.tmp", MARKER)  # the test never reads half a marker
    while True:
        time.sleep(60)


def _patch_checkpoints() -> None:
    finalize = ocp.path.atomicity.AtomicRenameTemporaryPath.finalize
    save = checkpoint.Checkpointer.save

    async def pausing_finalize(self):
        pause("checkpoint", self.get_final().name)
        await finalize(self)

    def waiting_save(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if POINT == f"checkpoint/{step}":
            self.wait()  # the loop stops here too: nothing after the checkpoint runs

    ocp.path.atomicity.AtomicRenameTemporaryPath.finalize = pausing_finalize
    checkpoint.Checkpointer.save = waiting_save


def main() -> None:
    _patch_checkpoints()
    callbacks = continual.Callbacks(
        after_step=lambda k, s: pause("train_step", k, s),
        before_evaluation=lambda k: pause("evaluation", k),
        before_solver=lambda k: pause("solver", k))
    continual.train = functools.partial(continual.train, callbacks=callbacks)
    from absl import app

    from launch import train
    app.run(train.main)


if __name__ == "__main__":
    main()
