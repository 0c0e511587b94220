"""Event-sourced activity service: durable event log, resumable SSE streams, projections."""
