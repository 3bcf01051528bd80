"""Build: the C++ extension elastic_decode._C and the package mapping of docs/architecture.md.

kernels/ is installed as elastic_decode.kernels and train/ as elastic_decode.train: a
top-level package named `kernels` would collide with the one transformers probes for. Every
package under elastic_decode/ is found, not listed (a hand list once left the server out of
non-editable installs; tests/test_packaging.py builds a wheel and imports every subpackage).
"""
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    packages=[*find_packages(include=["elastic_decode", "elastic_decode.*"]), "elastic_decode.kernels",
              "elastic_decode.train"],
    package_dir={
        "elastic_decode": "elastic_decode",
        "elastic_decode.kernels": "kernels",
        "elastic_decode.train": "train",
    },
    ext_modules=[
        CppExtension(
            name="elastic_decode._C",
            sources=["csrc/bindings.cpp", "csrc/block_allocator.cpp", "csrc/cpu_attention.cpp", "csrc/cpu_decoder.cpp",
                     "csrc/cpu_ops.cpp", "csrc/cpu_philox.cpp", "csrc/cpu_quant.cpp", "csrc/stand_in_cuda.cpp"],
            # -fopenmp: at::parallel_for (a header template) runs on OpenMP threads, torch's own runtime
            # (libgomp), and the `omp simd` reductions vectorise
            extra_compile_args=["-O3", "-std=c++20", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
