from setuptools import find_packages, setup

setup(
    name='mmdet_vanillanet',
    version='0.1.0',
    description='VanillaNet backbone for MMDetection 3.x',
    packages=find_packages(include=['mmdet_vanillanet', 'mmdet_vanillanet.*']),
    python_requires='>=3.9',
)
