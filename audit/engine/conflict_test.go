package engine_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/audit/engine"
	"github.com/kmsd-project/kmsd/kms"
)

// conflicting is a fault-injecting engine.Rows: its first conflicts
// transactions (all, if negative) lose the race for the log's end, as a
// replica's do when others append first; the next commits.
type conflicting struct {
	conflicts int64
	attempts  atomic.Int64
}

func (c *conflicting) WriteAudit(ctx context.Context, recs []*kms.AuditRecord) error {
	if n := c.attempts.Add(1); c.conflicts < 0 || n <= c.conflicts {
		return engine.ErrConflict
	}
	return nil
}
func (c *conflicting) RowsEnd(context.Context) (uint64, error)                    { return 0, nil }
func (c *conflicting) ReadRows(context.Context, uint64, uint64) ([][]byte, error) { return nil, nil }
func (c *conflicting) PutCheckpoint(context.Context, uint64, []byte) error        { return nil }
func (c *conflicting) LatestCheckpoint(context.Context) (uint64, []byte, error) {
	return 0, nil, kms.ErrNotFound
}

func startOn(t *testing.T, rows engine.Rows) *engine.Log {
	t.Helper()
	l := engine.New(rows, engine.Options{Shared: true})
	if err := l.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// TestConflictsRetriedForATime: a group that loses the race for the log's
// end is retried, well past 100 lost races, until it commits.
func TestConflictsRetriedForATime(t *testing.T) {
	engine.SetConflictBudget(t, 10*time.Second)
	rows := &conflicting{conflicts: 300}
	l := startOn(t, rows)
	r := &kms.AuditRecord{Time: "2026-01-01T00:00:00Z", Actor: "t", Operation: "op", Status: 200}
	if err := l.AppendAudit(context.Background(), r); err != nil {
		t.Fatalf("append after 300 lost races: %v", err)
	}
	if got := rows.attempts.Load(); got != 301 {
		t.Fatalf("%d attempts, want 301", got)
	}
	if !r.Committed {
		t.Fatal("the record is not marked committed")
	}
}

// TestConflictsRefusedAfterTheBudget: a group that keeps losing is refused
// with ErrConflict once the budget is spent, not before, and the log keeps
// serving.
func TestConflictsRefusedAfterTheBudget(t *testing.T) {
	const budget = 300 * time.Millisecond
	engine.SetConflictBudget(t, budget)
	rows := &conflicting{conflicts: -1}
	l := startOn(t, rows)
	start := time.Now()
	r := &kms.AuditRecord{Time: "2026-01-01T00:00:00Z", Actor: "t", Operation: "op", Status: 200}
	err := l.AppendAudit(context.Background(), r)
	if !errors.Is(err, engine.ErrConflict) || r.Committed {
		t.Fatalf("append that always loses: %v (committed %v), want ErrConflict", err, r.Committed)
	}
	if took := time.Since(start); took < budget {
		t.Fatalf("refused after %v, before the budget of %v", took, budget)
	}
	if rows.attempts.Load() < 2 {
		t.Fatalf("%d attempts: not retried", rows.attempts.Load())
	}
	rows.conflicts = 0 // the others stop appending
	if err := l.AppendAudit(context.Background(), &kms.AuditRecord{Time: "2026-01-01T00:00:00Z", Actor: "t", Operation: "op2", Status: 200}); err != nil {
		t.Fatalf("append once the race is won: %v", err)
	}
}
