from setuptools import find_packages, setup

setup(
    name='mmdet_vanillanet',
    version='0.1.0',
    description='VanillaNet backbone for MMDetection 3.x',
    packages=find_packages(include=['mmdet_vanillanet', 'mmdet_vanillanet.*']),
    python_requires='>=3.9',
    # Grad-CAM++ maps (tools/visualize_cam.py); torchcam needs only torch, numpy, pillow and matplotlib.
    extras_require={'cam': ['torchcam==0.5.0']},
)
