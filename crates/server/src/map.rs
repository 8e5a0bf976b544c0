//! `Map` and `MapStream`: one function over many inputs, each input a call of its own (a run of kind `map` in the
//! history, on any of the user's warm workers), up to a concurrency at once, results streamed back as they finish.
//!
//! - Inputs are read from the client's stream only as running ones finish, so a client that sends a generator's items
//!   as it makes them is held back by gRPC's flow control, not buffered here.
//! - The function is pickled once, alone; each input is a pickle of its `(args, kwargs)`. A worker is sent the
//!   function with each input and loads it once (the agent keeps the last one).
//! - Every message of the result stream names its input (`map_index`, numbered from 0 in the order sent): its logs,
//!   then its `return_value` or, for an input that could not run (its worker died, it ran past its timeout), its
//!   `map_error`. An error every input would meet (the environment does not build, the machine type is unknown, the
//!   server is stopping) ends the whole stream with its status instead.
//! - The client going away drops the map: its running inputs are cancelled and their workers stopped.

use std::collections::VecDeque;
use std::sync::Arc;

use fal_engine::LogBudget;
use fal_proto::controller::hosted_run_status::State;
use fal_proto::controller::{HostedMap, HostedRun, HostedRunResult, MapError, MapRequest};
use fal_proto::SerializedObject;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::admission::Place;
use crate::service::{invalid, log_message, run_message, Controller, Prepared};
use crate::store::Caller;

pub(crate) type MapResults = ReceiverStream<Result<HostedRunResult, Status>>;

/// An input's failure that every other input would meet too: it ends the map.
const ENDS_THE_MAP: [&str; 6] =
    ["invalid", "environment", "machine-type-unavailable", "call-depth", "server-stopped", "internal"];
/// The most inputs one map runs at once, whatever it asks.
const MAX_CONCURRENCY: usize = 1024;
/// Result messages held for a client that reads slowly; beyond them, no more inputs start.
const RESULTS_HELD: usize = 64;
/// The log bytes of a map (all its inputs) held for its client; beyond them, workers wait on their output.
const LOG_BUDGET: usize = 1 << 20;

/// Starts the map `map` (with its first inputs) of `caller`'s, reading further inputs from `more`; returns its
/// result stream.
pub(crate) async fn start(
    controller: &Controller,
    caller: Caller,
    place: Arc<Place>,
    authority: Option<String>,
    map: HostedMap,
    more: Option<Streaming<MapRequest>>,
) -> Result<MapResults, Status> {
    let HostedMap {
        environments,
        machine_requirements,
        function,
        inputs,
        setup_func,
        function_name,
        timeout_seconds,
        concurrency,
    } = map;
    let function = function.ok_or_else(|| invalid("HostedMap.function is missing"))?;
    if function.method != "cloudpickle" {
        return Err(invalid(format!(
            "a map's function must be pickled with \"cloudpickle\" (this project's SDK), not {:?}; with the original \
             client, submit one call per input instead",
            function.method
        )));
    }
    let mut run = HostedRun {
        environments,
        machine_requirements,
        function: Some(function),
        setup_func,
        function_name,
        timeout_seconds,
    };
    let mut template = controller.prepare(&caller, authority.as_deref(), &mut run).await?;
    template.call.function = Some(std::mem::take(&mut template.call.payload));
    let concurrency = concurrency
        .map_or_else(|| controller.capacity.fitting(&template.machine), |asked| asked as usize)
        .clamp(1, MAX_CONCURRENCY);
    tracing::info!(user = %caller.user_id, function = %template.function_name, concurrency, "map started");
    let (results, receiver) = mpsc::channel(RESULTS_HELD);
    let (log_sender, logs) = mpsc::unbounded_channel();
    let map = Map {
        controller: controller.clone(),
        caller,
        template,
        budget: LogBudget::new(LOG_BUDGET),
        log_sender,
        logs,
        results,
    };
    tokio::spawn(map.run(place, Inputs { pending: inputs.into(), more }, concurrency));
    Ok(ReceiverStream::new(receiver))
}

struct Map {
    controller: Controller,
    caller: Caller,
    /// Each input's call, but for its arguments.
    template: Prepared,
    budget: Arc<LogBudget>,
    /// Inputs' log messages, each with its size, counted against `budget` until sent.
    log_sender: mpsc::UnboundedSender<(HostedRunResult, usize)>,
    logs: mpsc::UnboundedReceiver<(HostedRunResult, usize)>,
    results: mpsc::Sender<Result<HostedRunResult, Status>>,
}

/// An input's outcome: its number, its run's id, its result or why it could not run.
type Finished = (u64, String, Result<SerializedObject, Status>);

impl Map {
    async fn run(mut self, _place: Arc<Place>, mut inputs: Inputs, concurrency: usize) {
        let mut running: JoinSet<Finished> = JoinSet::new();
        let (mut next, mut exhausted) = (0u64, false);
        // Returning drops `running`, which cancels the inputs still running and stops their workers.
        while !(exhausted && running.is_empty()) {
            tokio::select! {
                biased;
                () = self.results.closed() => return,
                Some((log, bytes)) = self.logs.recv() => {
                    self.budget.taken(bytes);
                    if self.results.send(Ok(log)).await.is_err() {
                        return;
                    }
                }
                Some(joined) = running.join_next(), if !running.is_empty() => {
                    let finished = joined.unwrap_or_else(|e| {
                        (u64::MAX, String::new(), Err(Status::internal(format!("a map input's task failed: {e}"))))
                    });
                    if !self.finished(finished).await {
                        return;
                    }
                }
                input = inputs.next(), if !exhausted && running.len() < concurrency => match input {
                    Ok(Some(input)) => {
                        if input.method != "cloudpickle" {
                            let error = invalid(format!(
                                "map input {next} is pickled with {:?}; a map's inputs are cloudpickle's",
                                input.method
                            ));
                            let _ = self.results.send(Err(error)).await;
                            return;
                        }
                        running.spawn(self.input(next, input));
                        next += 1;
                    }
                    Ok(None) => exhausted = true,
                    Err(status) => {
                        let _ = self.results.send(Err(status)).await;
                        return;
                    }
                },
            }
        }
        self.send_logs().await;
    }

    /// The call of input `index`.
    fn input(&mut self, index: u64, input: SerializedObject) -> impl std::future::Future<Output = Finished> {
        let mut prepared = self.template.clone();
        prepared.call.payload = input.definition;
        // Said once, with the first input.
        self.template.cut_keep_alive = None;
        let run_id = format!("{:016x}", rand::random::<u64>());
        let (sender, log_run_id) = (self.log_sender.clone(), run_id.clone());
        let on_log = move |line: fal_engine::LogLine| {
            let bytes = line.line.len();
            let message = HostedRunResult {
                map_index: Some(index),
                ..run_message(&log_run_id, vec![log_message(line)], State::InProgress)
            };
            let _ = sender.send((message, bytes));
        };
        let execution =
            self.controller.execute(&self.caller, prepared, "map", run_id.clone(), on_log, self.budget.clone());
        async move { (index, run_id, execution.await) }
    }

    /// Sends an input's outcome, after its logs; false when the map must end (the client went away, or the failure
    /// would be every input's).
    async fn finished(&mut self, (index, run_id, outcome): Finished) -> bool {
        self.send_logs().await;
        let message = match outcome {
            Ok(value) => Ok(HostedRunResult {
                map_index: Some(index),
                return_value: Some(value),
                ..run_message(&run_id, Vec::new(), State::Success)
            }),
            Err(status) => {
                let kind = status.metadata().get("fal-error-kind").and_then(|v| v.to_str().ok()).unwrap_or("internal");
                if ENDS_THE_MAP.contains(&kind) {
                    Err(status)
                } else {
                    let error = MapError {
                        kind: kind.to_string(),
                        message: status.message().to_string(),
                        code: status.code() as i32,
                    };
                    Ok(HostedRunResult {
                        map_index: Some(index),
                        map_error: Some(error),
                        ..run_message(&run_id, Vec::new(), State::InternalFailure)
                    })
                }
            }
        };
        let ends = message.is_err();
        self.results.send(message).await.is_ok() && !ends
    }

    /// Sends the log messages queued now.
    async fn send_logs(&mut self) {
        while let Ok((log, bytes)) = self.logs.try_recv() {
            self.budget.taken(bytes);
            if self.results.send(Ok(log)).await.is_err() {
                return;
            }
        }
    }
}

/// A map's inputs: those that came with it, then those of its stream, read as they are asked for.
struct Inputs {
    pending: VecDeque<SerializedObject>,
    more: Option<Streaming<MapRequest>>,
}

impl Inputs {
    async fn next(&mut self) -> Result<Option<SerializedObject>, Status> {
        loop {
            if let Some(input) = self.pending.pop_front() {
                return Ok(Some(input));
            }
            let Some(more) = self.more.as_mut() else { return Ok(None) };
            match more.message().await? {
                Some(request) if request.map.is_some() => {
                    return Err(invalid("only a map's first message names the map (MapRequest.map)"))
                }
                Some(request) => self.pending.extend(request.inputs),
                None => self.more = None,
            }
        }
    }
}
