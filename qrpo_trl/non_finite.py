"""Stop training at the first step whose gradients are not finite, before the optimizer writes them into the weights."""

import torch
import torch.distributed as dist
from transformers import TrainerCallback


class StopOnNonFiniteGradients(TrainerCallback):
    """
    Raises a `FloatingPointError` naming the step when, after clipping, a gradient holds NaN or inf: the loss of the
    step was not finite, or overflowed. Without it, the optimizer would make every weight NaN, and the logged loss would
    hide it (`logging_nan_inf_filter` logs the mean of the previous losses instead). Every process checks its gradients
    and the processes agree (sharded gradients differ between them), so that they all stop together.

    With fp16, the loss scaler skips the steps whose gradients overflow, which it expects to happen: nothing to check.
    Under DeepSpeed, gradients live in its engine, not in the parameters: they are not checked.
    """

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if args.fp16 or model is None:
            return
        gradients = [param.grad for param in model.parameters() if param.grad is not None]
        if not gradients:
            return
        total_norm = torch.nn.utils.get_total_norm(gradients)  # NaN or inf if any gradient is
        if hasattr(total_norm, "full_tensor"):  # a DTensor (FSDP2): over every shard
            total_norm = total_norm.full_tensor()
        finite = total_norm.isfinite().float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            raise FloatingPointError(
                f"Training step {state.global_step + 1}: the gradients hold NaN or inf values (the loss of this step "
                "is not finite, or overflowed). Training stops here, before the optimizer writes them into the "
                "weights. Check the settings (learning_rate, beta) and the data of this step's batch (rewards, "
                "reference log-probabilities)."
            )
