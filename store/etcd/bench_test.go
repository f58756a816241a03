package etcd_test

import (
	"context"
	"testing"

	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/etcd"
	"github.com/kmsd-project/kmsd/store/storetest"
)

// openB is open for benchmarks: a store on a new prefix of the package's
// member.
func openB(b *testing.B, sealer kms.Sealer) *etcd.Store {
	s, err := etcd.Open(context.Background(), client(b), etcd.Options{Prefix: newPrefix(b), Sealer: sealer})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close() })
	return s
}

// BenchmarkRecords: what the record tags cost on etcd (storetest.Bench).
func BenchmarkRecords(b *testing.B) {
	sealer := testhsm.Open(b)
	storetest.Bench(b, func(b *testing.B) kms.Store { return openB(b, sealer) })
}

// BenchmarkScrub: a scrub of a prefix of 1,000 keys with 10 versions each
// and 1,000 tokens.
func BenchmarkScrub(b *testing.B) {
	storetest.BenchScrub(b, openB(b, testhsm.Open(b)))
}
