package bolt_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/bolt"
	"github.com/kmsd-project/kmsd/store/storetest"
)

func benchRecord() *kms.AuditRecord {
	return &kms.AuditRecord{Time: "2026-11-23T00:00:00.123456789Z", RequestID: "0123456789abcdef", Actor: "0123456789abcdef", Role: "admin",
		Source: "127.0.0.1:50000", Operation: "GET /v1/keys/{name}/versions/{version}/public-key", Key: "bench", Version: 1, Status: 200, RespBytes: 2700}
}

// BenchmarkAppendAuditSerial is one durable audit record at a time: the
// latency of one group commit of size 1.
func BenchmarkAppendAuditSerial(b *testing.B) {
	s, err := bolt.Open(filepath.Join(b.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(b)})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	for b.Loop() {
		if err := s.Audit().AppendAudit(ctx, benchRecord()); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(s.Fsyncs())/float64(b.N), "fsyncs/op")
}

// BenchmarkAppendAuditParallel is 16 goroutines per core appending at once:
// group commit shares WAL frames (fsyncs) among them.
func BenchmarkAppendAuditParallel(b *testing.B) {
	s, err := bolt.Open(filepath.Join(b.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(b)})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	b.SetParallelism(8)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if err := s.Audit().AppendAudit(ctx, benchRecord()); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(s.Fsyncs())/float64(b.N), "fsyncs/op")
}

// BenchmarkRecords: what the record tags cost on bbolt (storetest.Bench).
func BenchmarkRecords(b *testing.B) {
	sealer := testhsm.Open(b)
	storetest.Bench(b, func(b *testing.B) kms.Store {
		s, err := bolt.Open(filepath.Join(b.TempDir(), "kms.db"), bolt.Options{Sealer: sealer})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { s.Close() })
		return s
	})
}

// BenchmarkScrub: a scrub of a store of 1,000 keys with 10 versions each
// and 1,000 tokens.
func BenchmarkScrub(b *testing.B) {
	s, err := bolt.Open(filepath.Join(b.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(b)})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	storetest.BenchScrub(b, s)
}
