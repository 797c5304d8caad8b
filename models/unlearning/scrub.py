"""SCRUB: a student moves away from its teacher on the forget rows and stays close on the retained rows.

Source: Kurmanji, Triantafillou, Hayes and Triantafillou, "Towards Unbounded Machine
Unlearning", NeurIPS 2023.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from models.batching import shuffled_batches, split_tensors
from models.data import Split
from models.device import autocast
from models.network import TabularMLP
from models.unlearning.base import UnlearnResult, check_model_type, copy_to_device, register_method, resolve_settings
from models.unlearning.loops import make_record, optimizer_step, refit_scaler, seeded_generator

logger = logging.getLogger(__name__)

SCRUB_DEFAULTS: dict[str, Any] = {
    # Passes over the retained rows. Each of the first `max_epochs` is preceded by one max-step pass over the forget rows.
    "epochs": 3,
    "max_epochs": 2,
    "lr": 5e-4,
    "batch_size": 256,
    "forget_batch_size": 64,
    # Weights of the min-step loss alpha * KL(teacher || student) + gamma * CE, on retained rows.
    "alpha": 1.0,
    "gamma": 1.0,
    # Distillation temperature. The KL is scaled by temperature**2, as in Hinton et al.'s distillation loss.
    "temperature": 4.0,
    "weight_decay": 1e-4,
    "max_grad_norm": 5.0,
    "seed": 0,
}


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Return the batch mean of KL(teacher || student) on temperature-softened outputs, times temperature**2."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=1)
    teacher_probs = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(student_log_probs, teacher_probs, reduction="batchmean") * temperature**2


@register_method("scrub")
def scrub(
    model: TabularMLP, forget: Split, retain: Split, val: Split, settings: dict, device: torch.device
) -> UnlearnResult:
    """Unlearn `forget` with SCRUB's alternating max-steps and min-steps.

    The teacher is a frozen copy of the input model and the student starts as
    another copy. In each of the first `max_epochs` epochs, a max-step pass over
    `forget` ascends the student's distillation KL from the teacher there. Every
    epoch then runs a min-step pass over `retain` on alpha * KL + gamma * CE, which
    keeps the student's outputs and accuracy on retained rows. `val` is not used.
    The student's scaler is refitted on `retain`, because its mean and std include
    the forget rows, while the teacher keeps the original one.
    """
    options = resolve_settings("scrub", SCRUB_DEFAULTS, settings)
    check_model_type("scrub", model)
    if len(retain) == 0:
        raise ValueError("The retain split is empty, so SCRUB's min-steps have nothing to preserve.")
    if options["temperature"] <= 0:
        raise ValueError(f"temperature must be positive, got {options['temperature']}.")

    started = time.perf_counter()
    generator = seeded_generator(options["seed"])

    teacher = copy_to_device(model, device).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    student = copy_to_device(model, device)
    refit_scaler(student, retain.x)
    optimizer = torch.optim.Adam(student.parameters(), lr=options["lr"], weight_decay=options["weight_decay"])

    x_retain, y_retain = split_tensors(retain, device)
    x_forget, _ = split_tensors(forget, device)

    steps = 0
    max_steps = 0
    for epoch in range(options["epochs"]):
        if epoch < options["max_epochs"] and len(forget) > 0:
            for rows in shuffled_batches(len(forget), options["forget_batch_size"], generator):
                rows = rows.to(device)
                optimizer.zero_grad()
                student_logits, teacher_logits = _forward_both(student, teacher, x_forget[rows], device)
                loss = -distillation_kl(student_logits, teacher_logits, options["temperature"])
                optimizer_step(student, optimizer, loss, max_grad_norm=options["max_grad_norm"])
                max_steps += 1

        for rows in shuffled_batches(len(retain), options["batch_size"], generator):
            rows = rows.to(device)
            optimizer.zero_grad()
            student_logits, teacher_logits = _forward_both(student, teacher, x_retain[rows], device)
            kl = distillation_kl(student_logits, teacher_logits, options["temperature"])
            loss = options["alpha"] * kl + options["gamma"] * F.cross_entropy(student_logits, y_retain[rows])
            optimizer_step(student, optimizer, loss, max_grad_norm=options["max_grad_norm"])
            steps += 1
    student.eval()

    logger.info("SCRUB ran %d min-steps and %d max-steps on %d forget rows.", steps, max_steps, len(forget))
    record = make_record("scrub", steps + max_steps, options["epochs"], started, device, options, {"max_steps": max_steps})
    return UnlearnResult(model=student, record=record)


def _forward_both(student: nn.Module, teacher: nn.Module, x: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the student's logits (train mode, with gradient) and the teacher's (eval mode, without), in float32."""
    student.train()
    with autocast(device):
        student_logits = student(x)
        with torch.no_grad():
            teacher_logits = teacher(x)
    return student_logits.float(), teacher_logits.float()
