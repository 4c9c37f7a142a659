//! The coordinator's Prometheus metrics: job and worker gauges read from the core at scrape
//! time, and the latency of every gRPC method, measured by a tower layer around the server.

use crate::handle::Handle;
use gantry_ops::prometheus_client::metrics::counter::Counter;
use gantry_ops::prometheus_client::metrics::family::Family;
use gantry_ops::prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use gantry_ops::{Collect, gauges, labels};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tonic::codegen::http;

type Latencies = Family<Vec<(String, String)>, Histogram, fn() -> Histogram>;
type Counts = Family<Vec<(String, String)>, Counter>;

/// gRPC latencies by method (time to the response, which for streams is their start).
#[derive(Clone)]
pub struct RpcMetrics {
    latency: Latencies,
    /// Calls refused before any handler ran, by method and status code.
    refused: Counts,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        fn histogram() -> Histogram {
            // 100 µs to ~3 s.
            Histogram::new(exponential_buckets(1e-4, 2.0, 16))
        }
        Self {
            latency: Family::new_with_constructor(histogram),
            refused: Counts::default(),
        }
    }
}

impl RpcMetrics {
    /// Counts a call refused before its handler (no credential, a wrong role, a limit).
    pub fn refused(&self, method: &str, code: tonic::Code) {
        self.refused
            .get_or_create(&labels(&[
                ("method", method),
                ("code", &format!("{code:?}")),
            ]))
            .inc();
    }

    /// Wraps a service so each request's latency is recorded.
    pub fn layer<S>(&self, inner: S) -> Timed<S> {
        Timed {
            inner,
            metrics: self.clone(),
        }
    }
}

/// A service whose calls are timed into [`RpcMetrics`].
#[derive(Clone)]
pub struct Timed<S> {
    inner: S,
    metrics: RpcMetrics,
}

impl<S, B> tower::Service<http::Request<B>> for Timed<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().to_string();
        let started = Instant::now();
        let response = self.inner.call(request);
        let latency = self.metrics.latency.clone();
        Box::pin(async move {
            let result = response.await;
            latency
                .get_or_create(&labels(&[("method", &method)]))
                .observe(started.elapsed().as_secs_f64());
            result
        })
    }
}

/// What a scrape of the coordinator returns.
pub fn collector(handle: Handle, rpc: RpcMetrics) -> Collect {
    Arc::new(move |registry| {
        let jobs = gauges(registry, "gantry_jobs", "Jobs by state.");
        let restarts = gauges(
            registry,
            "gantry_job_restarts",
            "Automatic restarts of each job over its life.",
        );
        let step = gauges(
            registry,
            "gantry_job_step",
            "Last reported step of each job.",
        );
        let loss = gauges(
            registry,
            "gantry_job_loss",
            "Last reported training loss of each job.",
        );
        let workers = gauges(registry, "gantry_workers", "Worker daemons by state.");
        let slots = gauges(
            registry,
            "gantry_worker_slots",
            "Rank slots of the live workers, used and free.",
        );
        handle.with(|core, _now| {
            for state in [
                "Pending",
                "Restarting",
                "Scheduled",
                "Running",
                "Succeeded",
                "Failed",
                "Cancelled",
            ] {
                jobs.get_or_create(&labels(&[("state", state)])).set(0.0);
            }
            for job in core.jobs() {
                jobs.get_or_create(&labels(&[("state", job.state.name())]))
                    .inc();
                let id = labels(&[("job", &job.id.0)]);
                restarts.get_or_create(&id).set(f64::from(job.restarts));
                step.get_or_create(&id).set(job.step as f64);
                if let Some(l) = job.loss {
                    loss.get_or_create(&id).set(l);
                }
            }
            for state in ["alive", "lost"] {
                workers.get_or_create(&labels(&[("state", state)])).set(0.0);
            }
            let (mut used_slots, mut free_slots) = (0, 0);
            for (worker, used) in core.workers() {
                let state = if worker.is_alive() { "alive" } else { "lost" };
                workers.get_or_create(&labels(&[("state", state)])).inc();
                if worker.is_alive() {
                    used_slots += used;
                    free_slots += worker.slots.saturating_sub(used);
                }
            }
            slots
                .get_or_create(&labels(&[("state", "used")]))
                .set(f64::from(used_slots));
            slots
                .get_or_create(&labels(&[("state", "free")]))
                .set(f64::from(free_slots));
        });
        registry.register(
            "gantry_rpc_duration_seconds",
            "Latency of the coordinator's gRPC methods.",
            rpc.latency.clone(),
        );
        registry.register(
            "gantry_rpc_refused",
            "gRPC calls refused before their handler ran, by method and status code.",
            rpc.refused.clone(),
        );
    })
}
