import os

# Some virtual machines (this project's CI among them) advertise Intel AMX but fault on its
# instructions; oneDNN would then crash bf16 matmuls on CPU with SIGILL. Cap oneDNN below AMX
# for the test process (it reads the variable once, when torch first uses it).
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
