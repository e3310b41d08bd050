#!/bin/bash
# The Ascend CANN environment for the launchers; they source it on Ascend hosts only
# (/usr/local/Ascend present or npu-smi on PATH). Safe to source by hand: it only sets variables.

# Where CANN lives: the installer records it, else the default prefix.
cann_info=/etc/Ascend/ascend_cann_install.info
if [ -f "$cann_info" ]; then
    cann_path=$(grep Install_Path "$cann_info" | cut -d "=" -f 2)
else
    cann_path=/usr/local/Ascend
fi
# (shellcheck cannot follow them: CANN installs them on the host.)
if [ -f "$cann_path/ascend-toolkit/set_env.sh" ]; then
    # shellcheck source=/dev/null
    source "$cann_path/ascend-toolkit/set_env.sh"
elif [ -f "$cann_path/nnae/set_env.sh" ]; then
    # shellcheck source=/dev/null
    source "$cann_path/nnae/set_env.sh"
else
    echo "[Warning] no CANN set_env.sh under $cann_path (ascend-toolkit or nnae): torch_npu may not find CANN" >&2
fi

# Host logs: errors only, not echoed to the terminal; no event logs.
export ASCEND_SLOG_PRINT_TO_STDOUT=0
export ASCEND_GLOBAL_LOG_LEVEL=3
export ASCEND_GLOBAL_EVENT_ENABLE=0
# Operator dispatch through the task queue (faster on every torch_npu release that has it).
export TASK_QUEUE_ENABLE=1
# Collective communication between the cards of this host.
export HCCL_WHITELIST_DISABLE=1
HCCL_IF_IP=$(hostname -I 2>/dev/null | awk '{print $1}')
export HCCL_IF_IP
export HCCL_CONNECT_TIMEOUT=1200
