package audit

import (
	"io"
	"log/slog"
	"sync/atomic"
	"time"
)

// Stream copies committed records, one JSON line each, to a sink (a file,
// stdout, a pipe to a SIEM agent). It never holds up a request for more than
// its timeout: when the sink is stuck and the buffer is full, records are
// dropped from the stream (counted and logged); the durable log stays the
// source of truth.
type Stream struct {
	ch      chan []byte
	timeout time.Duration
	dropped atomic.Uint64
	log     *slog.Logger
	done    chan struct{}
}

// NewStream starts copying to w. Close it to flush.
func NewStream(w io.Writer, timeout time.Duration, buffer int, log *slog.Logger) *Stream {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Stream{ch: make(chan []byte, buffer), timeout: timeout, log: log, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		for b := range s.ch {
			if _, err := w.Write(append(b, '\n')); err != nil {
				s.dropped.Add(1)
			}
		}
	}()
	return s
}

// Emit queues one record, waiting at most the timeout.
func (s *Stream) Emit(rec []byte) {
	select {
	case s.ch <- rec:
		return
	default:
	}
	t := time.NewTimer(s.timeout)
	defer t.Stop()
	select {
	case s.ch <- rec:
	case <-t.C:
		if n := s.dropped.Add(1); n&(n-1) == 0 { // log at 1, 2, 4, 8, ...
			s.log.Warn("audit stream sink is stuck: records dropped from the stream (not from the log)", "dropped", n)
		}
	}
}

// Dropped counts records the stream lost.
func (s *Stream) Dropped() uint64 { return s.dropped.Load() }

// Close stops accepting records and waits until the queued ones are written
// or the timeout passes.
func (s *Stream) Close() {
	close(s.ch)
	select {
	case <-s.done:
	case <-time.After(s.timeout):
	}
}
