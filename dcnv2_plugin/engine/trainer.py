"""detectron2's `DefaultTrainer`, with COCO evaluation that works without
detectron2's compiled ops, the offset learning-rate factor, data-parallel
training on CPU processes as well as GPUs, exact resume, verified
checkpoints, and non-finite losses traced to the geometry layers."""

import contextlib
import logging
import os
import weakref
from typing import List, Optional

import detectron2.engine.defaults as detectron2_defaults
import detectron2.utils.comm as comm
from detectron2.engine import DefaultTrainer, HookBase, hooks
from detectron2.evaluation import COCOEvaluator
from torch import nn

from .._detectron2_compat import has_compiled_ops
from ..modeling import build_optimizer
from ..ops import GeometryPredictor
from .checkpoint import VerifiedCheckpointer
from .metrics_state import capture_metrics_state, restore_metrics_state
from .nonfinite import NonFiniteTracer
from .random_state import capture_rng_states, restore_rng_states
from .train_loader import ResumableTrainLoader, build_resumable_train_loader

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _cpu_data_parallel(device: str):
    """detectron2's `create_ddp_model` gives DistributedDataParallel the
    process's GPU (`device_ids`), which it refuses for a model on the CPU:
    while the trainer is built, a CPU model is wrapped without one."""
    if not device.startswith("cpu"):
        yield
        return
    create_ddp_model = detectron2_defaults.create_ddp_model

    def create_cpu_ddp_model(model, **kwargs):
        return create_ddp_model(model, **{"device_ids": None, **kwargs})

    detectron2_defaults.create_ddp_model = create_cpu_ddp_model
    try:
        yield
    finally:
        detectron2_defaults.create_ddp_model = create_ddp_model


def frozen_untrained_geometry_layers(model: nn.Module) -> List[str]:
    """The geometry layers of `model` that cannot train (frozen) and are all
    zero, as they start: their offsets stay zero for good."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, GeometryPredictor)
        and any(True for _ in module.parameters())
        and not any(p.requires_grad for p in module.parameters())
        and not any(p.any() for p in module.parameters())
    ]


class _ProcessStateGatherer(HookBase):
    """At each iteration that ends with a checkpoint, collects every process's
    random state and data position, for the checkpoint that the main process
    writes next. Placed before detectron2's checkpointer hook."""

    def __init__(self, checkpoint_period: int):
        self._period = checkpoint_period

    def after_step(self):
        iteration = self.trainer.iter
        if (iteration + 1) % self._period == 0 or iteration >= self.trainer.max_iter - 1:
            self.trainer._gathered_process_states = (iteration, comm.all_gather(self.trainer.process_state()))


class Trainer(DefaultTrainer):
    """detectron2's trainer with this project's optimizer, COCO evaluation,
    checkpoints and resume.

    A checkpoint holds, besides the model and detectron2's iteration and
    learning-rate schedule: the optimizer (detectron2 0.6 and the package index's snapshot
    leave it out), each process's random generators and data position, and
    the metrics history; resuming from it continues exactly as the run that
    wrote it would have (bit for bit on the CPU)."""

    def __init__(self, cfg):
        with _cpu_data_parallel(cfg.MODEL.DEVICE):
            super().__init__(cfg)
        self.checkpointer = VerifiedCheckpointer(self.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        for hook in self._hooks:
            if isinstance(hook, hooks.PeriodicCheckpointer):
                hook.checkpointer = self.checkpointer
        self._nonfinite = NonFiniteTracer(self.model)
        self._gathered_process_states = None
        self._restored_rng = None
        self._restored_metrics = None

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        # detectron2's fast COCO evaluation needs its compiled ops.
        use_fast_impl = has_compiled_ops()
        if use_fast_impl:
            logger.info("COCO evaluation with detectron2's fast implementation")
        else:
            logger.info("COCO evaluation with pycocotools (detectron2's compiled ops are missing)")
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=use_fast_impl)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_resumable_train_loader(cfg)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        # Evaluation draws from the global generators (its data loader's
        # seed); during training, the steps after it must not depend on that.
        states = capture_rng_states()
        try:
            return super().test(cfg, model, evaluators)
        finally:
            restore_rng_states(states)

    def build_hooks(self):
        hook_list = super().build_hooks()
        checkpoint_position = next(
            index
            for index, hook in enumerate(hook_list)
            if isinstance(hook, (hooks.PeriodicCheckpointer, hooks.EvalHook))
        )
        hook_list.insert(checkpoint_position, _ProcessStateGatherer(self.cfg.SOLVER.CHECKPOINT_PERIOD))
        return hook_list

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        frozen = frozen_untrained_geometry_layers(self.checkpointer.model)
        if frozen:
            raise ValueError(
                f"MODEL.BACKBONE.FREEZE_AT={self.cfg.MODEL.BACKBONE.FREEZE_AT} freezes geometry layers that are "
                f"still at their zero initialization ({', '.join(frozen)}): MODEL.WEIGHTS has no trained offsets "
                "for them, so their offsets would stay zero and the deformable convs act as regular ones. Lower "
                "MODEL.BACKBONE.FREEZE_AT below the first deformable stage, or load weights with trained offsets"
            )

    def run_step(self):
        self._nonfinite.start_step()
        try:
            super().run_step()
        except FloatingPointError as error:
            explanation = f"{self._nonfinite.explain_losses()}\n{self._nonfinite.explain_geometry()}"
            raise FloatingPointError(f"{error}\n{explanation}") from error
        self._nonfinite.check_step(self.iter)

    def process_state(self) -> dict:
        """This process's random generators and data position."""
        state = {"rng": capture_rng_states()}
        if isinstance(self.data_loader, ResumableTrainLoader):
            state["data"] = self.data_loader.state_dict()
        return state

    def _periodic_writers(self) -> List[hooks.PeriodicWriter]:
        return [hook for hook in self._hooks if isinstance(hook, hooks.PeriodicWriter)]

    def _all_process_states(self) -> Optional[List[dict]]:
        if self._gathered_process_states is not None and self._gathered_process_states[0] == self.iter:
            return self._gathered_process_states[1]
        if comm.get_world_size() == 1:
            return [self.process_state()]
        logger.warning(
            "A checkpoint saved outside the checkpoint period holds no random state or data position of the "
            "other processes: resuming from it will not be exact"
        )
        return None

    def state_dict(self):
        state = super().state_dict()
        state.setdefault("_trainer", self._trainer.state_dict())
        processes = self._all_process_states()
        if processes is not None:
            state["processes"] = processes
        storage = getattr(self, "storage", None)
        if storage is not None:
            writers = [writer for hook in self._periodic_writers() for writer in hook._writers]
            state["metrics"] = capture_metrics_state(storage, writers)
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if "load_state_dict" not in vars(DefaultTrainer):  # detectron2 0.6 neither saves nor loads the optimizer
            if "_trainer" in state:
                self._trainer.load_state_dict(state["_trainer"])
            else:
                logger.warning("The checkpoint has no optimizer state: SGD momentum starts again from zero")
        processes = state.get("processes")
        if processes is None:
            logger.warning(
                "The checkpoint has no random state or data position (it was not written by this trainer): the "
                "resumed run draws a new data order"
            )
        elif len(processes) != comm.get_world_size():
            logger.warning(
                "The checkpoint was written by %d process(es), this run has %d: the data order and random "
                "state cannot continue as they were; the resumed run draws new ones",
                len(processes),
                comm.get_world_size(),
            )
        else:
            process = processes[comm.get_rank()]
            if "data" in process and isinstance(self.data_loader, ResumableTrainLoader):
                self.data_loader.load_state_dict(process["data"])
            self._restored_rng = process["rng"]
        self._restored_metrics = state.get("metrics")

    def before_train(self):
        super().before_train()
        if self._restored_metrics is not None and comm.is_main_process():
            writer_hooks = self._periodic_writers()
            restore_metrics_state(
                self._restored_metrics, self.storage, [writer for hook in writer_hooks for writer in hook._writers]
            )
            # The interrupted run may have been stopped between its last
            # checkpoint and the metrics written at the same iteration.
            self.iter = self.storage.iter = self.start_iter - 1
            for hook in writer_hooks:
                hook.after_step()
            self.iter = self.storage.iter = self.start_iter
        if self._restored_rng is not None:
            # Last, so that nothing before the first step draws from them.
            restore_rng_states(self._restored_rng)
        self._restored_rng = self._restored_metrics = None
