//! `grpc.health.v1.Health` streams, answered by the relay itself.

use super::*;

impl Relay<'_> {
    /// `grpc.health.v1.Health` `Check` and `Watch`, answered by the sidecar: SERVING while the function can be routed to (at zero instances too),
    /// NOT_SERVING once draining; an unknown service is NOT_FOUND (`Watch`: SERVICE_UNKNOWN).
    /// A `Watch` gets the status now and again whenever a reload or draining changes it; it ends
    /// when the sidecar drains.
    pub(super) fn health_check(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let request = s.health.take().unwrap_or_default();
        let Some(service) = grpc::health::parse_request(&request) else {
            let e = CallError::new(Kind::BadRequest, "not a HealthCheckRequest");
            self.fail(id, &e);
            return;
        };
        let known = service.is_empty() || self.front.function(&service).is_some();
        s.answered = true;
        let mut b = Vec::new();
        encode_field(&mut b, b":status", b"200", false);
        encode_field(&mut b, b"content-type", b"application/grpc", false);
        if !known && !s.watch {
            status_fields(&mut b, 5, &format!("unknown service {service}"));
            self.caller.send_headers(id, &b, true);
            self.finish(id);
            return;
        }
        self.caller.send_headers(id, &b, false);
        if s.watch {
            // Sent by `watch_update`, which sees a status differing from this one.
            self.watches.insert(id, Watching { service, sent: 0 });
            self.watch_update();
            return;
        }
        let status = grpc::health::status(true, self.front.drain.is_draining());
        s.to_caller.push_back(grpc::health::message(status));
        s.trailers = Some(ok_trailers());
        self.pump_caller(id);
    }

    /// Sends each health `Watch` its status if it changed; ends them once the sidecar drains.
    pub(super) fn watch_update(&mut self) {
        let draining = self.draining || self.front.drain.is_draining();
        let ids: Vec<u32> = self.watches.keys().copied().collect();
        for id in ids {
            let Some(Watching { service, sent }) = self.watches.get_mut(&id) else {
                continue;
            };
            let known = service.is_empty() || self.front.function(service).is_some();
            let now = grpc::health::status(known, draining);
            let Some(s) = self.streams.get_mut(&id) else {
                self.watches.remove(&id);
                continue;
            };
            if *sent != now {
                *sent = now;
                s.to_caller.push_back(grpc::health::message(now));
            }
            if draining {
                s.trailers = Some(ok_trailers());
                self.watches.remove(&id);
            }
            self.pump_caller(id);
        }
    }
}
