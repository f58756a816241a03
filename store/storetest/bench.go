package storetest

import (
	"context"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/kms"
)

// Bench measures what a store's record tags cost (BENCHMARKS.md, issue
// 20): the reads of an uncached request (its token, the key's header, one
// version), a rotation (a header and a new version, with an audit record),
// and a token's use written down.
func Bench(b *testing.B, open func(b *testing.B) kms.Store) {
	ctx := context.Background()
	setup := func(b *testing.B) kms.Store {
		s := open(b)
		if err := s.CreateKey(ctx, &kms.Key{Name: "bench", Primary: 1, Latest: 1}, &kms.Version{Number: 1, State: kms.StateEnabled, Sealed: make([]byte, 4000), PublicKey: make([]byte, 1952)}, nil); err != nil {
			b.Fatal(err)
		}
		if err := s.CreateToken(ctx, &kms.Token{ID: "0123456789abcdef", Role: "admin", Keys: []string{"*"}, Hash: make([]byte, 32)}, nil); err != nil {
			b.Fatal(err)
		}
		return s
	}
	b.Run("read-token-key-version", func(b *testing.B) {
		s := setup(b)
		for b.Loop() {
			if _, err := s.GetToken(ctx, "0123456789abcdef"); err != nil {
				b.Fatal(err)
			}
			if _, err := s.GetKey(ctx, "bench"); err != nil {
				b.Fatal(err)
			}
			if _, err := s.GetVersion(ctx, "bench", 1); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("rotate", func(b *testing.B) {
		s := setup(b)
		for b.Loop() {
			err := s.UpdateKey(ctx, "bench", func(tx kms.KeyTx) ([]*kms.AuditRecord, error) {
				k := tx.Key()
				n := k.Latest + 1
				if err := tx.AddVersion(&kms.Version{Number: n, State: kms.StateEnabled, Sealed: make([]byte, 4000), PublicKey: make([]byte, 1952)}); err != nil {
					return nil, err
				}
				k.Primary = n
				return []*kms.AuditRecord{{Time: "2026-12-07T00:00:00Z", Actor: "0123456789abcdef", Operation: "POST /v1/keys/{name}/rotate", Key: "bench", Version: n, Status: 201}}, nil
			})
			if err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("record-token-use", func(b *testing.B) {
		s := setup(b)
		i := 0
		for b.Loop() {
			i++
			if err := s.RecordTokenUse(ctx, map[string]time.Time{"0123456789abcdef": time.Unix(int64(1_800_000_000+i), 0).UTC()}); err != nil {
				b.Fatal(err)
			}
		}
	})
}
