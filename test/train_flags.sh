#!/bin/bash
# Sourced by the training launchers. append_train_flags NAME...: for each NAME whose shell variable is
# set and not empty, append train.py's flag "-NAME value" to the array cmd (a parameter left out keeps
# the config's or the recipe's value).
append_train_flags() {
    local name
    for name in "$@"; do
        if [[ ${!name} != "" ]]; then
            cmd+=("-$name" "${!name}")
        fi
    done
}
