"""Literal references the tests compare against, and the per-dtype tolerances, in one place.

Tolerances (relative RMS error, `rel_rms`, steadier than elementwise rtol for reductions over
thousands of columns):
- fp64: the eager path and the oracle differ only by summation order: 1e-10.
- fp32: same math in fp32 accumulation over up to ~1e5 terms: 1e-5.
- bf16 / fp16: the loss is computed in fp32 from the same (rounded) inputs, so the loss keeps the
  fp32 bound; the gradient is returned in the input dtype, so it carries that dtype's rounding
  (bf16 has 8 significant bits, 2^-8 = 3.9e-3; fp16 has 11, 2^-11 = 4.9e-4), plus margin.
- FUSED_GRAD_RTOL: a bf16 gradient written in the forward (the fused rows path) and then
  multiplied by a grad_output != 1 is rounded twice: up to 2 * 2^-8 = 7.8e-3 per element, and a
  peaked softmax makes the relative RMS as large as its largest elements' error: 1.2e-2. (With
  grad_output = 1, the usual step, it is rounded once.)
"""
import torch
import torch.nn.functional as F

LOSS_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
FUSED_GRAD_RTOL = {**GRAD_RTOL, torch.bfloat16: 1.2e-2}


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_2 / ||expected||_2, computed in fp64."""
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def official_dino_loss(student_output, teacher_output, center, ncrops, student_temp, teacher_temp):
    """The official formulation, literally: a double loop over crop pairs, one log_softmax each."""
    student_out = student_output / student_temp
    student_out = student_out.chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / teacher_temp, dim=-1)
    teacher_out = teacher_out.detach().chunk(2)
    total_loss = 0
    n_loss_terms = 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue  # we skip cases where student and teacher operate on the same view
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    return total_loss / n_loss_terms


def make_logits(batch, ncrops, out_dim, dtype=torch.float32, teacher_scale=1.0, seed=0,
                device="cpu"):
    """Cosine-like student logits in [-1, 1] and teacher logits (scaled), crop-major."""
    g = torch.Generator().manual_seed(seed)
    student = (torch.rand(ncrops * batch, out_dim, generator=g) * 2 - 1)
    teacher = (torch.rand(2 * batch, out_dim, generator=g) * 2 - 1) * teacher_scale
    center = torch.randn(1, out_dim, generator=g) * 0.1
    return (student.to(device=device, dtype=dtype), teacher.to(device=device, dtype=dtype),
            center.to(device))


def official_clip_gradients(model, clip):
    """The official per-parameter gradient clipping, literally (one host sync per parameter)."""
    norms = []
    for _, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def official_ema_loop(teacher_params, student_params, momentum):
    """The official teacher update, literally: one parameter at a time, three kernels each."""
    with torch.no_grad():
        for param_q, param_k in zip(student_params, teacher_params):
            param_k.data.mul_(momentum).add_((1 - momentum) * param_q.detach().data)


def literal_soft_cross_entropy(student, teacher, pair_weight, student_temp, teacher_temp=None,
                               center=None, row_weight=None, scale=1.0):
    """scale * sum_b w_b sum_{v,i} W[v][i] * -sum_k q_ib,k log_softmax(S_vb / tau_s)_k, literally:
    one log_softmax per student crop and one (B, K) product per pair."""
    V, G = len(pair_weight), len(pair_weight[0])
    B = student.shape[0] // V
    if teacher_temp is None:
        q = teacher
    else:
        c = 0 if center is None else center.reshape(1, -1)
        q = F.softmax((teacher - c) / teacher_temp, dim=-1)
    total = 0
    for v in range(V):
        log_p = F.log_softmax(student[v * B:(v + 1) * B] / student_temp, dim=-1)
        for i in range(G):
            ce = -(q[i * B:(i + 1) * B] * log_p).sum(dim=-1)
            if row_weight is not None:
                ce = ce * row_weight
            total = total + pair_weight[v][i] * ce.sum()
    return total * scale
