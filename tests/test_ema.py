"""Teacher EMA: the Triton kernel (under TRITON_INTERPRET=1 on CPU, compiled on CUDA) and the eager
`torch._foreach_lerp_` path against the official per-parameter loop; the table cache; layouts;
validation before any write; the official cosine momentum schedule; DDP / torch.compile unwrapping.

Tolerance, in one place. Every path computes m*t + (1-m)*s with a few fp32 roundings (fp64 for
fp64 tensors) and rounds once to the teacher's dtype (the eager path with a bf16 teacher and an
fp32 student first rounds the student to bf16, which adds at most (1-m) * half an ulp of it). The
oracle computes in fp64 and rounds once. Elementwise, then,
    |path - oracle| <= 4 * eps(teacher dtype) * (|t| + |s|)
(a few unit roundoffs of the fp32 math, one rounding of the result, one of the oracle), relative to
the inputs rather than to the result because (1-m)*s may cancel m*t. Momentum 1 and 0 are exact:
the teacher stays bit-identical, or becomes the student rounded to its dtype.
"""
import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from dino_fast.backend import interpreter_enabled
from dino_fast.ema import TeacherEMA, ema_update_
from dino_fast.models import unwrap_model

gpu = pytest.mark.gpu
needs_interpreter = pytest.mark.skipif(
    not interpreter_enabled(),
    reason="Triton on CPU needs TRITON_INTERPRET=1 (conftest sets it when there is no CUDA)")

# (backend, device) of every path under test; the CPU Triton path is the interpreter
PATHS = [
    pytest.param("eager", "cpu", id="eager-cpu"),
    pytest.param("triton", "cpu", marks=needs_interpreter, id="triton-interpreter"),
    pytest.param("eager", "cuda", marks=gpu, id="eager-cuda"),
    pytest.param("triton", "cuda", marks=gpu, id="triton-cuda"),
]
TRITON_PATHS = [p for p in PATHS if p.values[0] == "triton"]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=gpu, id="cuda")]

# Element counts around the kernel's block (4096): 1 element, odd sizes, one short of / exactly /
# one past a block, several blocks with a ragged tail.
SIZES = [1, 2, 3, 31, 100, 385, 1000, 4095, 4096, 4097, 5000, 8193]
N_TENSORS = 240
MOMENTA = [0.0, 0.5, 0.996, 1.0]
# (teacher dtype, student dtype) cycled over the tensors; "mixed" makes four dtype groups, hence
# four kernel launches in one call
DTYPE_CYCLES = {
    "fp32": [(torch.float32, torch.float32)],
    "bf16-teacher": [(torch.bfloat16, torch.float32)],
    "mixed": [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
              (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)],
}


def make_pairs(dtype_cycle, device="cpu", n=N_TENSORS, seed=0):
    """n (teacher, student) pairs of mixed shapes and sizes, values of mixed scales."""
    g = torch.Generator().manual_seed(seed)
    teachers, students = [], []
    for i in range(n):
        numel = SIZES[i % len(SIZES)]
        shape = (numel,) if i % 3 else (1, numel)  # some 2-D, as weights
        t_dtype, s_dtype = dtype_cycle[i % len(dtype_cycle)]
        scale = 10.0 ** (i % 5 - 2)
        teachers.append((torch.randn(shape, generator=g) * scale).to(device, t_dtype))
        students.append((torch.randn(shape, generator=g) * scale).to(device, s_dtype))
    return teachers, students


def official_loop_oracle(teachers, students, momentum):
    """The official per-parameter loop, `param_k.mul_(m).add_((1 - m) * param_q)`, in fp64 and
    rounded once to each teacher's dtype. Returns new tensors."""
    return [(t.double().mul(momentum).add((1 - momentum) * s.double())).to(t.dtype)
            for t, s in zip(teachers, students)]


def error_bound(t, s):
    """The elementwise bound of the module docstring for teacher t and student s (fp64)."""
    return 4 * torch.finfo(t.dtype).eps * (t.double().abs() + s.double().abs())


def assert_close_to_oracle(outs, teachers_before, students, momentum, what, slack=1):
    """Each out within `slack` error bounds of the official loop applied to (teacher, student)."""
    for i, (out, t, s) in enumerate(zip(outs, teachers_before, students)):
        ref = official_loop_oracle([t], [s], momentum)[0]
        bound = slack * error_bound(t, s)
        err = (out.double() - ref.double()).abs()
        assert out.dtype == t.dtype and out.shape == t.shape
        assert bool((err <= bound).all()), (
            f"{what}: tensor {i} ({t.dtype}, {t.numel()} elements) differs from the official loop "
            f"by up to {err.max().item():.3g} (bound {bound.max().item():.3g})")


def bits(t):
    """The raw bytes of t: equal bits means bit-identical values (NaN and -0.0 included)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8).cpu()


def assert_bit_identical(actual, expected):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and torch.equal(bits(a), bits(e)), f"tensor {i} differs"


# ----------------------------------------------------------------------------------------------
# values

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", list(DTYPE_CYCLES))
@pytest.mark.parametrize("momentum", MOMENTA)
def test_triton_and_foreach_match_official_loop_over_hundreds_of_tensors(device, dtypes,
                                                                         momentum):
    teachers, students = make_pairs(DTYPE_CYCLES[dtypes], device)
    before = [t.clone() for t in teachers]
    students_before = [s.clone() for s in students]
    results = {}
    backends = ["eager", "triton"] if (device == "cuda" or interpreter_enabled()) else ["eager"]
    for backend in backends:
        out = [t.clone() for t in before]
        assert ema_update_(out, students, momentum, backend=backend) == backend
        assert_close_to_oracle(out, before, students, momentum, backend)
        results[backend] = out
        if momentum == 1.0:  # the teacher does not move, not even by a rounding
            assert_bit_identical(out, before)
        if momentum == 0.0:  # the teacher becomes the student, rounded once to its dtype
            assert_bit_identical(out, [s.to(t.dtype) for t, s in zip(before, students)])
    assert_bit_identical(students, students_before)  # the student is only read
    if "triton" in results:  # and the two paths agree with each other (two bounds apart)
        for i, (a, b, t, s) in enumerate(zip(results["triton"], results["eager"], before,
                                             students)):
            assert bool(((a.double() - b.double()).abs() <= 2 * error_bound(t, s)).all()), i


@pytest.mark.parametrize("backend,device", PATHS)
def test_bf16_teacher_is_rounded_once_from_fp32_math(backend, device):
    # A bf16 teacher with the small increment (1 - 0.996) * (s - t): fp32 math rounded once
    # matches the correctly rounded fp64 result except for rare double-rounding ties, and is never
    # more than 1 ulp off. bf16 arithmetic (a rounding per operation) is 2-3 ulps off in places,
    # and its mul/add form misses in 6 % of the elements (measured on these inputs).
    g = torch.Generator().manual_seed(1)
    s_dtype = torch.float32 if backend == "triton" else torch.bfloat16  # eager: no cast of s
    t = torch.randn(50_000, generator=g).to(device, torch.bfloat16)
    s = (t.float() + 0.05 * torch.randn(50_000, generator=g).to(device)).to(s_dtype)
    ref = official_loop_oracle([t], [s], 0.996)[0]
    ema_update_([t], [s], 0.996, backend=backend)
    ulps = (t.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
    assert int(ulps.max()) <= 1
    assert float((ulps != 0).float().mean()) < 0.01


@pytest.mark.parametrize("backend,device", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_equal_to_student_stays_put_as_momentum_nears_one(backend, device, dtype):
    # The EMA of a constant is that constant. m*t + (1-m)*s with m and 1 - m each rounded to fp32
    # scales t by m32 + w32 != 1 and drifts, by an ulp here and there, exactly where the schedule
    # ends (m -> 1); the lerp form t + (1-m)*(s - t) does not.
    s = torch.randn(20_000, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    t = s.clone()
    for m in (0.996, 0.9999, 1 - 1e-7, 1 - 1.5 * 2**-24, 0.3):
        ema_update_([t], [s], m, backend=backend)
        assert_bit_identical([t], [s])


@pytest.mark.parametrize("backend,device", PATHS)
def test_update_bumps_teacher_version_counters(backend, device):
    # the Triton writes bypass autograd: the launcher must bump the counters itself, so a graph
    # that saved a teacher tensor refuses to backward through the modified value
    teachers, students = make_pairs(DTYPE_CYCLES["fp32"], device, n=3)
    versions = [t._version for t in teachers]
    ema_update_(teachers, students, 0.9, backend=backend)
    assert all(t._version > v for t, v in zip(teachers, versions))


def test_parameters_that_require_grad_are_updated():
    student, teacher = nn.Linear(3, 4), nn.Linear(3, 4)  # teacher params require grad here
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update_(teacher.parameters(), student.parameters(), 0.7, backend="eager")
    # the bound is of the inputs' magnitudes (teacher before, student), not the result's
    assert_close_to_oracle([p.detach() for p in teacher.parameters()], before,
                           [p.detach() for p in student.parameters()], 0.7, "eager")


# ----------------------------------------------------------------------------------------------
# device tables: cached, rebuilt when a tensor moves

@pytest.mark.parametrize("backend,device", TRITON_PATHS)
def test_tables_are_cached_and_rebuilt_when_the_student_storage_moves(backend, device):
    from dino_fast.kernels.ema import PLAN_CACHE
    teachers, students = make_pairs(DTYPE_CYCLES["mixed"], device, n=24)
    ema_update_(teachers, students, 0.9, backend=backend)
    builds, hits = PLAN_CACHE.builds, PLAN_CACHE.hits
    ema_update_(teachers, students, 0.9, backend=backend)
    assert (PLAN_CACHE.builds, PLAN_CACHE.hits) == (builds, hits + 1)  # same tensors: reused

    # move the student, as .to() or load_state_dict(assign=True) do; keep the old storage alive,
    # with other values, so that stale tables would give a wrong answer rather than a crash
    old_storage = students
    students = [s.clone() * -3 + 1 for s in old_storage]
    before = [t.clone() for t in teachers]
    ema_update_(teachers, students, 0.9, backend=backend)
    assert PLAN_CACHE.builds == builds + 1
    plan = PLAN_CACHE.get(teachers, students)  # the plan that just ran (a cache hit now)
    table = torch.cat([g["student_ptrs"] for g in plan.launches]).tolist()
    assert sorted(table) == sorted(s.data_ptr() for s in students)
    assert_close_to_oracle(teachers, before, students, 0.9, "after the move")


@pytest.mark.parametrize("backend,device", TRITON_PATHS)
def test_teacher_ema_follows_load_state_dict_assign(backend, device):
    from dino_fast.kernels.ema import PLAN_CACHE
    student = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3)).to(device)
    teacher = copy.deepcopy(student)
    ema = TeacherEMA(student, teacher, 0.5, total_steps=10, backend=backend)
    ema.step()
    builds = PLAN_CACHE.builds
    new_state = {k: torch.randn_like(v) for k, v in student.state_dict().items()}
    student.load_state_dict(new_state, assign=True)  # new Parameter objects, new storage
    before = [p.clone() for p in teacher.parameters()]
    m = ema.step()
    assert PLAN_CACHE.builds == builds + 1
    assert ema.last_backend == "triton"
    assert_close_to_oracle(list(teacher.parameters()), before, list(student.parameters()), m,
                           "after load_state_dict(assign=True)")


# ----------------------------------------------------------------------------------------------
# layouts

@pytest.mark.parametrize("backend,device", PATHS)
def test_transposed_parameters_with_the_same_layout_work(backend, device):
    t = torch.randn(70, 90, device=device).t()  # dense but not contiguous
    s = torch.randn(70, 90, device=device).t()
    before = t.clone()
    ema_update_([t], [s], 0.8, backend=backend)
    assert_close_to_oracle([t], [before], [s], 0.8, backend)


@pytest.mark.parametrize("backend,device", PATHS)
def test_views_into_one_flat_buffer_at_unaligned_offsets_work(backend, device):
    # parameters packed into one buffer (flat-parameter wrappers do this) start at any element
    # offset: the kernel must not assume 16-byte aligned pointers for those, and the aligned
    # ones keep the vectorised path (a launch of their own)
    sizes = [3, 4097, 5000, 4, 2]
    starts = 1 + np.cumsum([0] + sizes[:-1])  # element offsets 1, 4, 4101, ...: only [1] aligned
    t_buf = torch.randn(sum(sizes) + 2, device=device)
    s_buf = torch.randn(sum(sizes) + 2, device=device)
    teachers = [t_buf[a:a + n] for a, n in zip(starts, sizes)]
    students = [s_buf[a:a + n] for a, n in zip(starts, sizes)]
    t_before = t_buf.clone()
    ema_update_(teachers, students, 0.9, backend=backend)
    assert_close_to_oracle(teachers, [t_before[a:a + n] for a, n in zip(starts, sizes)],
                           students, 0.9, backend)
    assert torch.equal(t_buf[0], t_before[0]) and torch.equal(t_buf[-1], t_before[-1])
    if backend == "triton":
        from dino_fast.kernels.ema import PLAN_CACHE
        plan = PLAN_CACHE.get(teachers, students)
        assert sorted(g["aligned"] for g in plan.launches) == [False, True]


@pytest.mark.parametrize("backend,device", TRITON_PATHS)
def test_triton_refuses_layouts_it_cannot_walk_and_writes_nothing(backend, device):
    teachers, students = make_pairs(DTYPE_CYCLES["fp32"], device, n=5)
    before = [t.clone() for t in teachers]
    cases = {
        "strides": (torch.randn(9, 8, device=device), torch.randn(8, 9, device=device).t()),
        "not a dense": (torch.randn(9, 8, device=device)[:, :4],
                        torch.randn(9, 4, device=device)),
    }
    for match, (t, s) in cases.items():
        with pytest.raises(ValueError, match=match):
            ema_update_(teachers + [t], students + [s], 0.5, backend="triton")
        assert_bit_identical(teachers, before)
        # the eager path takes any layout
        expected = official_loop_oracle([t], [s], 0.5)
        t_before = t.clone()
        ema_update_([t], [s], 0.5, backend="eager")
        assert_close_to_oracle([t], [t_before], [s], 0.5, "eager")
        assert torch.allclose(t, expected[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", TRITON_PATHS)
def test_fp64_goes_to_eager_under_auto_and_is_refused_by_triton(backend, device):
    t, s = torch.randn(10, device=device, dtype=torch.float64), torch.randn(10, device=device,
                                                                           dtype=torch.float64)
    before = t.clone()
    with pytest.raises(TypeError, match=r"teacher_params\[0\] has dtype torch.float64"):
        ema_update_([t], [s], 0.5, backend="triton")
    assert torch.equal(t, before)
    if device == "cuda":  # on CPU "auto" is eager anyway
        assert ema_update_([t], [s], 0.5, backend="auto") == "eager"
        assert torch.allclose(t, 0.5 * before + 0.5 * s, rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------------------------
# validation: a clear error naming the argument, and nothing modified

def _bad_inputs(device):
    """(name, teacher list, student list, momentum, exception, message) of bad calls; each breaks
    only the last pair, so a path that wrote while validating would have modified the others."""
    teachers, students = make_pairs(DTYPE_CYCLES["mixed"], device, n=8)
    last_t, last_s = teachers[-1], students[-1]
    t_ok, s_ok = teachers[:-1], students[:-1]
    return teachers, [
        ("count", teachers, s_ok, 0.5, ValueError, "student_params has 7"),
        ("shape", teachers, s_ok + [last_s.reshape(-1)[:-1]], 0.5, ValueError,
         r"student_params\[7\] has shape"),
        ("device", teachers, s_ok + [last_s.to("meta")], 0.5, ValueError,
         r"student_params\[7\] is on meta"),
        ("int student", teachers, s_ok + [last_s.long()], 0.5, TypeError,
         r"student_params\[7\] must be a floating-point"),
        ("int teacher", t_ok + [last_t.long()], students, 0.5, TypeError,
         r"teacher_params\[7\] must be a floating-point"),
        ("not a tensor", teachers, s_ok + [[1.0]], 0.5, TypeError,
         r"student_params\[7\] must be a torch.Tensor"),
        ("momentum < 0", teachers, students, -0.1, ValueError, r"momentum must be in \[0, 1\]"),
        ("momentum > 1", teachers, students, 1.0001, ValueError, r"momentum must be in \[0, 1\]"),
        ("momentum nan", teachers, students, float("nan"), ValueError, "momentum must be in"),
        ("momentum str", teachers, students, "0.9", TypeError, "momentum must be a real number"),
        ("momentum bool", teachers, students, True, TypeError, "momentum must be a real number"),
        ("empty", [], [], 0.5, ValueError, "empty"),
    ]


@pytest.mark.parametrize("backend,device", PATHS)
def test_bad_input_raises_and_leaves_every_teacher_bit_identical(backend, device):
    teachers, cases = _bad_inputs(device)
    before = [t.clone() for t in teachers]
    for name, ts, ss, momentum, exc, match in cases:
        with pytest.raises(exc, match=match):
            ema_update_(ts, ss, momentum, backend=backend)
        assert_bit_identical(teachers, before), name
    with pytest.raises(ValueError, match="backend must be one of"):
        ema_update_(teachers, teachers, 0.5, backend="cuda")
    assert_bit_identical(teachers, before)


def test_triton_without_interpreter_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    t = torch.zeros(3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ema_update_([t], [torch.ones(3)], 0.5, backend="triton")
    assert torch.equal(t, torch.zeros(3))


# ----------------------------------------------------------------------------------------------
# the momentum schedule

def official_cosine_scheduler(base_value, final_value, epochs, niter_per_ep):
    """The official DINO schedule without warm-up (utils.cosine_scheduler), written out."""
    iters = np.arange(epochs * niter_per_ep)
    return final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters /
                                                                        len(iters)))


@pytest.mark.parametrize("base,final,epochs,niter", [(0.996, 1.0, 100, 37), (0.99, 0.9995, 3, 5),
                                                     (0.5, 0.5, 2, 1)])
def test_schedule_equals_official_cosine_at_every_step(base, final, epochs, niter):
    official = official_cosine_scheduler(base, final, epochs, niter)
    total = epochs * niter
    ema = TeacherEMA(nn.Linear(2, 2), nn.Linear(2, 2), base, final, total_steps=total)
    # same float64 operations in the same order as the official array: equal, not just close
    assert np.array_equal([ema.momentum(i) for i in range(total)], official)
    assert ema.momentum(0) == base and isinstance(ema.momentum(total - 1), float)


def test_step_walks_the_schedule_and_update_follows_the_global_iteration():
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    ema = TeacherEMA(student, teacher, total_steps=6, backend="eager")
    official = official_cosine_scheduler(0.996, 1.0, 2, 3)
    expected = [p.detach().clone() for p in teacher.parameters()]
    for it in range(4):
        m = ema.step()
        assert m == pytest.approx(official[it], abs=1e-15) and ema.last_momentum == m
        expected = official_loop_oracle(expected, list(student.parameters()), m)
    assert ema.num_updates == 4 and ema.last_backend == "eager"
    assert_close_to_oracle(list(teacher.parameters()), expected,
                           [torch.zeros_like(p) for p in student.parameters()], 1.0, "4 steps")
    assert ema.update(5) == pytest.approx(official[5], abs=1e-15)
    assert ema.num_updates == 6


def test_step_past_the_schedule_raises_and_modifies_nothing():
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    ema = TeacherEMA(student, teacher, total_steps=2, backend="eager")
    ema.step(), ema.step()
    before = [p.clone() for p in teacher.parameters()]
    with pytest.raises(ValueError, match=r"step must be in \[0, 2\) \(total_steps=2"):
        ema.step()
    with pytest.raises(ValueError, match="step must be in"):
        ema.update(-1)
    with pytest.raises(TypeError, match="step must be an integer"):
        ema.update(1.0)
    assert_bit_identical(list(teacher.parameters()), before)
    assert ema.num_updates == 2


def test_state_dict_restores_the_iteration_counter():
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    ema = TeacherEMA(student, teacher, total_steps=10, backend="eager")
    for _ in range(3):
        ema.step()
    resumed = TeacherEMA(student, copy.deepcopy(teacher), total_steps=10, backend="eager")
    resumed.load_state_dict(ema.state_dict())
    assert resumed.num_updates == 3
    assert resumed.step() == ema.momentum(3)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(total_steps=0), ValueError, "total_steps must be >= 1"),
    (dict(total_steps=10.0), TypeError, "total_steps must be an integer"),
    (dict(total_steps=10, base_momentum=1.5), ValueError, r"base_momentum must be in \[0, 1\]"),
    (dict(total_steps=10, final_momentum=-1), ValueError, r"final_momentum must be in"),
    (dict(total_steps=10, backend="fast"), ValueError, "backend must be one of"),
])
def test_teacher_ema_rejects_bad_settings(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        TeacherEMA(nn.Linear(2, 2), nn.Linear(2, 2), **kwargs)


def test_teacher_ema_rejects_models_that_do_not_match():
    with pytest.raises(ValueError, match=r"missing in the student: \['2.weight', '2.bias'\]"):
        TeacherEMA(nn.Sequential(nn.Linear(2, 2)),
                   nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)), total_steps=5)
    with pytest.raises(ValueError, match=r"teacher_params\[0\] \(weight\) has shape \(3, 2\)"):
        TeacherEMA(nn.Linear(2, 2), nn.Linear(2, 3), total_steps=5).step()
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="same module"):
        TeacherEMA(torch.compile(model), model, total_steps=5)


def test_buffers_are_left_alone_unless_asked_and_integer_buffers_always():
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    student.train()(torch.randn(8, 3))  # running stats and num_batches_tracked move
    for include in (False, True):
        teacher = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        bn_before = {k: v.clone() for k, v in teacher[1].named_buffers()}
        TeacherEMA(student, teacher, 0.25, total_steps=3, include_buffers=include).step()
        bn = dict(teacher[1].named_buffers())
        assert torch.equal(bn["num_batches_tracked"], bn_before["num_batches_tracked"])
        for name in ("running_mean", "running_var"):
            if include:
                expected = 0.25 * bn_before[name] + 0.75 * dict(student[1].named_buffers())[name]
                assert torch.allclose(bn[name], expected, rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(bn[name], bn_before[name])


# ----------------------------------------------------------------------------------------------
# wrapped students: DDP and torch.compile

@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group, enough to build a real DistributedDataParallel on CPU."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_unwrap_model_sees_through_compile_and_ddp_in_any_nesting(process_group):
    model = nn.Linear(3, 3)
    compiled = torch.compile(model)  # an OptimizedModule; nothing is compiled until it is called
    assert unwrap_model(compiled) is model
    ddp = nn.parallel.DistributedDataParallel(model)
    assert unwrap_model(ddp) is model
    assert unwrap_model(torch.compile(ddp)) is model
    assert unwrap_model(nn.parallel.DistributedDataParallel(compiled)) is model
    assert unwrap_model(model) is model


@pytest.mark.parametrize("wrap", ["ddp", "compile", "compile(ddp)"])
def test_teacher_ema_updates_the_teacher_from_a_wrapped_student(process_group, wrap):
    student = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 2))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    wrapped = {"ddp": lambda m: nn.parallel.DistributedDataParallel(m),
               "compile": torch.compile,
               "compile(ddp)": lambda m: torch.compile(nn.parallel.DistributedDataParallel(m)),
               }[wrap](student)
    # the official script wraps the teacher in DDP too when it has batch norms
    ema = TeacherEMA(wrapped, nn.parallel.DistributedDataParallel(teacher), total_steps=4,
                     backend="eager")
    before = [p.clone() for p in teacher.parameters()]
    m = ema.step()
    assert ema.student is student and ema.teacher is teacher
    assert_close_to_oracle(list(teacher.parameters()), before, list(student.parameters()), m,
                           wrap)
    assert not torch.equal(before[0], teacher[0].weight)


# ----------------------------------------------------------------------------------------------
# TeacherEMA: everything an update would reject is refused at construction

def test_teacher_ema_rejects_shapes_that_do_not_match_at_construction():
    with pytest.raises(ValueError, match=r"teacher_params\[0\] \(weight\) has shape \(5, 3\) but "
                                         r"student_params\[0\] \(weight\) has shape \(4, 3\)"):
        TeacherEMA(nn.Linear(3, 4), nn.Linear(3, 5), total_steps=5)


def test_teacher_ema_rejects_integer_tensors_at_construction_and_devices_at_update():
    student, teacher = nn.Linear(3, 4), nn.Linear(3, 4)
    student.bias = nn.Parameter(torch.zeros(4, dtype=torch.long), requires_grad=False)
    teacher.bias = nn.Parameter(torch.zeros(4, dtype=torch.long), requires_grad=False)
    with pytest.raises(TypeError, match=r"teacher_params\[1\] \(bias\) must be a floating-point"):
        TeacherEMA(student, teacher, total_steps=5)
    # a bf16 teacher of an fp32 student is fine (ema_update_ takes it)
    TeacherEMA(nn.Linear(3, 4), nn.Linear(3, 4).bfloat16(), total_steps=5).step()
    # the models may still move after the EMA is built (it looks their tensors up at each
    # update): devices are the update's to check, before it changes anything
    student, teacher = nn.Linear(3, 4), nn.Linear(3, 4)
    ema = TeacherEMA(student.to("meta"), teacher, total_steps=5)
    before = [p.clone() for p in teacher.parameters()]
    with pytest.raises(ValueError, match=r"student_params\[0\] \(weight\) is on meta but "
                                         r"teacher_params\[0\] is on cpu"):
        ema.step()
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    assert ema.num_updates == 0
    student.to_empty(device="cpu")
    ema.step()
    assert ema.num_updates == 1


def test_teacher_ema_with_triton_is_built_before_the_models_move():
    """backend="triton" with the models still on the CPU (moved to the GPU afterwards): built
    without complaint; the update says what it needs."""
    ema = TeacherEMA(nn.Linear(3, 4).double(), nn.Linear(3, 4).double(), total_steps=5,
                     backend="triton")
    with pytest.raises((RuntimeError, TypeError), match="triton|Triton|float64"):
        ema.step()
    assert ema.num_updates == 0


@pytest.mark.parametrize("student,teacher,arg", [("net", nn.Linear(2, 2), "student"),
                                                 (nn.Linear(2, 2), None, "teacher"),
                                                 ([torch.zeros(2)], nn.Linear(2, 2), "student")])
def test_teacher_ema_rejects_what_is_not_a_module(student, teacher, arg):
    with pytest.raises(TypeError, match=f"{arg} must be an nn.Module, got "):
        TeacherEMA(student, teacher, total_steps=5)


@pytest.mark.parametrize("state,exc,match", [
    ({"num_updates": 99}, ValueError, r"state\['num_updates'\] must be in \[0, total_steps=5\]"),
    ({}, ValueError, r"state must have exactly the key 'num_updates'.*got keys \[\]"),
    ({"num_updates": 2, "step": 3}, ValueError, r"got keys \['num_updates', 'step'\]"),
    ({"center": 1}, ValueError, "state must have exactly the key 'num_updates'"),
    ([("num_updates", 2)], TypeError, "state must be a dict"),
])
def test_load_state_dict_rejects_a_bad_state_and_keeps_the_counter(state, exc, match):
    ema = TeacherEMA(nn.Linear(2, 2), nn.Linear(2, 2), total_steps=5, backend="eager")
    ema.step()
    with pytest.raises(exc, match=match):
        ema.load_state_dict(state)
    assert ema.num_updates == 1
    assert ema.step() == ema.momentum(1)


def test_load_state_dict_accepts_up_to_a_finished_schedule_and_no_further():
    ema = TeacherEMA(nn.Linear(2, 2), nn.Linear(2, 2), total_steps=5, backend="eager")
    with pytest.raises(ValueError, match=r"state\['num_updates'\] must be in \[0, "
                                         r"total_steps=5\].*got 6"):
        ema.load_state_dict({"num_updates": 6})
    assert ema.num_updates == 0
    ema.load_state_dict({"num_updates": np.int64(5)})
    assert ema.num_updates == 5 and isinstance(ema.num_updates, int)
    with pytest.raises(ValueError, match=r"step must be in \[0, 5\)"):
        ema.step()  # the schedule is over: what an uninterrupted run would see too
