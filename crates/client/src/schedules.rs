//! Schedules and the run history as a client sees them: the cron RPCs (those of isolate-proto 0.0.37) and our
//! `ListRuns`/`GetRunLogs`, as `Client` methods.

use fal_proto::controller::{
    ActivationResultType, CancelCronRequest, CronResultType, GetActivationLogsRequest, GetRunLogsRequest,
    GetRunLogsResult, ListActivationsRequest, ListCronsRequest, ListRunsRequest, ListRunsResult, RegisterCronRequest,
};
use fal_proto::Log;

use crate::{Client, ClientError};

impl Client {
    /// Schedules the registered function `revision` at the times of `cron` (UTC); returns the schedule's id.
    pub async fn register_cron(&self, revision: &str, cron: &str) -> Result<String, ClientError> {
        let request = RegisterCronRequest { application_id: revision.to_string(), cron: cron.to_string() };
        let result = self.grpc.clone().register_cron(self.request(request)).await?.into_inner();
        Ok(result.result.map(|r| r.cron_id).unwrap_or_default())
    }

    pub async fn list_crons(&self) -> Result<Vec<CronResultType>, ClientError> {
        Ok(self.grpc.clone().list_crons(self.request(ListCronsRequest {})).await?.into_inner().crons)
    }

    /// A schedule's activations, newest first.
    pub async fn list_activations(&self, cron_id: &str) -> Result<Vec<ActivationResultType>, ClientError> {
        let request = ListActivationsRequest { cron_id: cron_id.to_string() };
        Ok(self.grpc.clone().list_activations(self.request(request)).await?.into_inner().activations)
    }

    pub async fn activation_logs(&self, cron_id: &str, activation_id: &str) -> Result<Vec<Log>, ClientError> {
        let request =
            GetActivationLogsRequest { cron_id: cron_id.to_string(), activation_id: activation_id.to_string() };
        Ok(self.grpc.clone().get_activation_logs(self.request(request)).await?.into_inner().logs)
    }

    pub async fn cancel_cron(&self, cron_id: &str) -> Result<(), ClientError> {
        self.grpc.clone().cancel_cron(self.request(CancelCronRequest { cron_id: cron_id.to_string() })).await?;
        Ok(())
    }

    /// One page of the run history, newest first.
    pub async fn list_runs(&self, request: ListRunsRequest) -> Result<ListRunsResult, ClientError> {
        Ok(self.grpc.clone().list_runs(self.request(request)).await?.into_inner())
    }

    pub async fn run_logs(&self, run_id: &str) -> Result<GetRunLogsResult, ClientError> {
        let request = GetRunLogsRequest { run_id: run_id.to_string() };
        Ok(self.grpc.clone().get_run_logs(self.request(request)).await?.into_inner())
    }
}
