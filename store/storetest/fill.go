package storetest

import (
	"context"
	"fmt"
	"testing"

	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/internal/storekit"
)

// Scrubber is a store with a scrub (bbolt, etcd).
type Scrubber interface {
	kms.Store
	Scrub(ctx context.Context) (storekit.ScrubReport, error)
}

// BenchScrub fills s (FillForScrub) and times scrubs of it, reporting
// how many records each checked.
func BenchScrub(b *testing.B, s Scrubber) {
	FillForScrub(b, s)
	var n int
	for b.Loop() {
		rep, err := s.Scrub(context.Background())
		if err != nil {
			b.Fatal(err)
		}
		n = rep.Records
	}
	b.ReportMetric(float64(n), "records")
}

// FillForScrub writes 1,000 keys of 10 versions (4 KB sealed, 2 KB public
// each) and 1,000 tokens: the store a scrub benchmark reads.
func FillForScrub(b *testing.B, s kms.Store) {
	ctx := context.Background()
	for i := range 1000 {
		name := fmt.Sprintf("k%04d", i)
		if err := s.CreateKey(ctx, &kms.Key{Name: name, Primary: 1, Latest: 1}, &kms.Version{Number: 1, State: kms.StateEnabled, Sealed: make([]byte, 4000), PublicKey: make([]byte, 1952)}, nil); err != nil {
			b.Fatal(err)
		}
		err := s.UpdateKey(ctx, name, func(tx kms.KeyTx) ([]*kms.AuditRecord, error) {
			for n := uint64(2); n <= 10; n++ {
				if err := tx.AddVersion(&kms.Version{Number: n, State: kms.StateEnabled, Sealed: make([]byte, 4000), PublicKey: make([]byte, 1952)}); err != nil {
					return nil, err
				}
			}
			return nil, nil
		})
		if err != nil {
			b.Fatal(err)
		}
		if err := s.CreateToken(ctx, &kms.Token{ID: fmt.Sprintf("%016x", i), Role: "reader", Hash: make([]byte, 32)}, nil); err != nil {
			b.Fatal(err)
		}
	}
}
