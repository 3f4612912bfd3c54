"""The facts a benchmark table states about the machine: date, CPU (and GPU), versions, threads, load."""
import datetime
import os
import platform

import torch


def _cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package):
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:  # noqa: BLE001  (absent or unreadable: say so in the table)
        return 'absent'


def machine_info(device):
    """Date, machine, versions and load: the table's header."""
    info = dict(
        date=datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z'),
        cpu=_cpu_name(), logical_cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        versions={p: _version(p) for p in ('torch', 'mmcv', 'mmdet', 'mmengine', 'onnx', 'onnxruntime')},
        onednn=torch.backends.mkldnn.is_available(), device=str(device))
    if torch.device(device).type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
        # PyTorch's defaults let cuDNN convs use TF32 while matmuls stay fp32: say which ran.
        info['tf32'] = dict(convs=torch.backends.cudnn.allow_tf32, matmul=torch.backends.cuda.matmul.allow_tf32)
    try:
        info['load_before'] = os.getloadavg()
    except OSError:
        info['load_before'] = None
    return info
