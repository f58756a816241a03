package app

import (
	"context"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"

	"github.com/kmsd-project/kmsd/internal/metrics"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/store/bolt"
)

// TestScrapesDoNotDriveTheStore: a scraper looping on the metrics
// listener (unauthenticated on loopback) cannot turn each scrape into
// store writes. The review measured two scrape loops cutting audited
// throughput by three quarters: every scrape read the audit log's size,
// which moves the journal's rows into bbolt first, a write transaction
// whenever a request had come between two scrapes. Now the log is read
// at most every auditReadEvery.
func TestScrapesDoNotDriveTheStore(t *testing.T) {
	st, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	reg := metrics.New("kmsd")
	a, err := New(context.Background(), Config{Store: st, AuditStore: st.Audit(), Sealer: testhsm.Open(t), Metrics: reg,
		AdminToken: func(string) error { return nil }})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	h := a.Handler()
	if _, err := reg.Gather(); err != nil {
		t.Fatal(err)
	}
	before := st.Commits()
	const scrapes = 20
	for range scrapes {
		// An audited request, so that the journal holds a row again.
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/healthz", nil))
		if rec.Code != http.StatusOK {
			t.Fatalf("healthz: %d", rec.Code)
		}
		if _, err := reg.Gather(); err != nil {
			t.Fatal(err)
		}
	}
	if n := st.Commits() - before; n > 1 {
		t.Fatalf("%d scrapes made %d store write transactions, want at most 1", scrapes, n)
	}
}
