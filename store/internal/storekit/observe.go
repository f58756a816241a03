package storekit

import (
	"sync/atomic"
	"time"
)

// Observer is told of each write transaction a store ends: how long it
// took and how it ended: "ok", "error" (the store failed), "rollback"
// (the change was refused before commit: a bad request, a guard) or
// "conflict" (a compare lost to another writer; the store re-reads and
// retries).
type Observer func(d time.Duration, outcome string)

// Observed holds a store's Observer; the zero value has none.
type Observed struct{ p atomic.Pointer[Observer] }

// Set sets the observer; nil removes it.
func (o *Observed) Set(fn Observer) {
	if fn == nil {
		o.p.Store(nil)
		return
	}
	o.p.Store(&fn)
}

// Done reports a transaction that started at start.
func (o *Observed) Done(start time.Time, outcome string) {
	if fn := o.p.Load(); fn != nil {
		(*fn)(time.Since(start), outcome)
	}
}

// Outcome is "ok" for a nil error, "error" otherwise.
func Outcome(err error) string {
	if err == nil {
		return "ok"
	}
	return "error"
}
