# Sourced by the training launchers after train.py has finished: reads the run's log and writes the
# Ascend template's summary. Expects log_file, loss_file, summary, Network, RANK_SIZE, BatchSize,
# DeviceType, CaseName and e2e_time to be set by the launcher.
# "Epoch N FPS:x" is clips per second over all ranks, from the epoch's 5th iteration to its end.
FPS=$(grep -aE '^Epoch [0-9]+ FPS:' "$log_file" | tail -n 1 | awk -F 'FPS:' '{print $2}')
# Per-iteration lines are "{iteration}:<TAB>loss:{loss}<TAB>time:{seconds}<TAB>" (loss averaged over ranks).
grep -aE $'^[0-9]+:\tloss:' "$log_file" | awk -F '\t' '{sub("loss:", "", $2); print $2}' > "$loss_file"
train_accuracy=$(tail -n 1 "$loss_file")
validation_loss=$(grep -a '^Validation loss' "$log_file" | tail -n 1 | awk '{print $NF}')
if [[ $FPS == "" || $train_accuracy == "" ]]; then
    echo "[Error] no 'FPS:' or loss line in $log_file: training ran no iteration" >&2
    exit 1
fi

echo "------------------ Final result ------------------"
echo "Final Performance images/sec : $FPS"
echo "Final Train Accuracy : ${train_accuracy}"
echo "E2E Training Duration sec : $e2e_time"

ActualFPS=${FPS}
TrainingTime=$(awk "BEGIN {printf \"%.2f\", ${BatchSize} * ${RANK_SIZE} * 1000 / ${FPS}}")  # ms per iteration
ActualLoss=${train_accuracy}
{
    echo "Network = ${Network}"
    echo "RankSize = ${RANK_SIZE}"
    echo "BatchSize = ${BatchSize}"
    echo "DeviceType = ${DeviceType}"
    echo "CaseName = ${CaseName}"
    echo "ActualFPS = ${ActualFPS}"
    echo "TrainingTime = ${TrainingTime}"
    echo "TrainAccuracy = ${train_accuracy}"
    echo "ActualLoss = ${ActualLoss}"
    echo "E2ETrainingTime = ${e2e_time}"
    echo "ValidationLoss = ${validation_loss}"
} > "$summary"
echo "Summary: $summary"
