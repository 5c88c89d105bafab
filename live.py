"""train.py --serve: view.py's page and tiles during training, rendered from the live weights.

The server (tileserver.py) answers on its own thread (start_server: tornado's event loop), but every
render waits in the scene's RenderQueue and runs on the training thread between two steps
(LiveView.on_train_batch_end), so tiles never see weights half-way through an optimizer step.
Nobody looking costs one empty-queue check per step; somebody looking costs at most about one
step's time per step in renders.
"""
import threading
import time

import lightning.pytorch as pl

import tileserver

LIVE_REFRESH = 3.0      # seconds between tile refreshes of a watched run
MIN_BUDGET = 0.02       # seconds of rendering per step at least, however short the steps


class LiveView(pl.Callback):
    """Serve `field` (the module being trained, fitting FieldConfig `config` to the uint8
    (H, W, C) `source`) on http://host:port/ from construction until the process ends;
    OSError (one line) when the port cannot be had."""

    def __init__(self, field, config, source, port, host="127.0.0.1", first_step=0):
        info = dict(width=config.width, height=config.height, channels=config.channels,
                    config=config, global_step=first_step)
        self.scene = tileserver.Scene(field, info, source, live=True)
        self.server, self.url = tileserver.start_server(self.scene, host, port)
        self.last_refresh = self.last_end = time.monotonic()
        print(f"train.py: the fit live at {self.url}", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.monotonic()
        step_seconds, self.last_end = now - self.last_end, now
        self.scene.step = trainer.global_step
        watched = now - self.scene.seen < 2 * LIVE_REFRESH
        if watched and now - self.last_refresh >= LIVE_REFRESH:
            self.scene.update(step=trainer.global_step)     # the page then asks for new tiles
            self.last_refresh = now
        if self.scene.queue.run_pending(budget=max(MIN_BUDGET, step_seconds)):
            self.last_end = time.monotonic()                # the next step's time, not ours

    def on_validation_end(self, trainer, pl_module):
        psnr = trainer.callback_metrics.get("val/psnr")
        if psnr is not None:
            with self.scene.lock:
                self.scene.curve.append((trainer.global_step, round(float(psnr), 3)))

    def on_train_end(self, trainer, pl_module):
        # training is over: renders run in a thread of their own until the process exits
        self.scene.update(step=trainer.global_step)
        threading.Thread(target=self.scene.queue.work, args=(threading.Event(),),
                         daemon=True, name="live-render").start()
