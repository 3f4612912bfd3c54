import sys

from setuptools import find_packages, setup

try:  # the kernel is compiled against the torch it will run with: install torch first, then this (no isolation)
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    sys.exit('mmdet_vanillanet compiles a CPU kernel against torch: install torch first, then this package with '
             "pip's --no-build-isolation (`make install` does both).")

# The fused VanillaNet's CPU kernels (mmdet_vanillanet/csrc/): the depthwise conv for AVX-512 CPUs, compiled for
# AVX-512 by target attributes (the build runs on any x86-64 machine), and the channels-last to NCHW copy.
CPU_KERNELS = CppExtension(
    'mmdet_vanillanet._cpu_kernels',
    ['mmdet_vanillanet/csrc/depthwise_conv.cpp', 'mmdet_vanillanet/csrc/nchw_copy.cpp'],
    depends=['mmdet_vanillanet/csrc/huge_page_output.h'],
    extra_compile_args=['-O3', '-fopenmp'], extra_link_args=['-fopenmp'])

setup(
    name='mmdet_vanillanet',
    version='0.1.0',
    description='VanillaNet backbone for MMDetection 3.x',
    packages=find_packages(include=['mmdet_vanillanet', 'mmdet_vanillanet.*']),
    ext_modules=[CPU_KERNELS],
    cmdclass={'build_ext': BuildExtension},
    # exception notes (BaseException.add_note) and torchcam 0.5 need Python 3.11
    python_requires='>=3.11',
    license='MIT',
    # What the package imports, at the versions it needs; `make install` installs the tested versions
    # (requirements/constraints.txt) and then this package with --no-deps. mmcv must be built with its ops
    # (MMCV_WITH_OPS=1):
    # mmdet 3.3 refuses mmcv 2.2. torch >= 2.6 loads checkpoints weights-only by default and has the
    # allow-list API; numpy 2 is where the allow-listed numpy.dtypes and numpy._core names live.
    install_requires=[
        'torch>=2.6',
        'numpy>=2,<3',
        'mmcv>=2.0.0,<2.2.0',
        'mmengine>=0.10.4,<1.0',
        'mmdet>=3.3.0,<3.4',
        'pycocotools',
        'opencv-python',
        'matplotlib',
    ],
    extras_require={
        # Grad-CAM++ maps (tools/visualize_cam.py); torchcam needs only torch, numpy, pillow and matplotlib.
        'cam': ['torchcam==0.5.0'],
        # ONNX export and its check (tools/export_onnx.py, the benchmark's ONNX rows)
        'onnx': ['onnx>=1.16', 'onnxruntime>=1.18'],
        # int8 backbones (tools/quantize.py, --int8): PT2E static quantization with torchao's X86InductorQuantizer
        'int8': ['torchao>=0.18'],
        # the benchmark's OpenVINO rows (the CPU runtime the exported backbone and RetinaNet deploy to)
        'openvino': ['openvino>=2026.4'],
    },
)
