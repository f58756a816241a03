package engine

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"golang.org/x/mod/sumdb/tlog"

	"github.com/kmsd-project/kmsd/kms"
)

// TestRowsMatchTlog: the hashes a row carries, computed from the last
// complete subtree of each level, are the ones tlog.StoredHashes computes
// from every hash stored before, for batches of any size.
func TestRowsMatchTlog(t *testing.T) {
	stored := map[int64]tlog.Hash{}
	reader := tlog.HashReaderFunc(func(idx []int64) ([]tlog.Hash, error) {
		out := make([]tlog.Hash, len(idx))
		for i, x := range idx {
			h, ok := stored[x]
			if !ok {
				return nil, fmt.Errorf("hash %d not stored", x)
			}
			out[i] = h
		}
		return out, nil
	})
	r := rand.New(rand.NewPCG(1, 2))
	var p position
	for p.next < 1500 {
		recs := make([]*kms.AuditRecord, 1+r.IntN(40))
		for i := range recs {
			recs[i] = &kms.AuditRecord{Time: "2026-01-01T00:00:00Z", Actor: "t", Operation: fmt.Sprint("op", p.next, i), Status: 200}
		}
		rows, datas, after := p.encode(recs)
		for i, row := range rows {
			n := int64(p.next) + int64(i)
			want, err := tlog.StoredHashes(n, datas[i], reader)
			if err != nil {
				t.Fatal(err)
			}
			hs, rec, err := splitRow(row)
			if err != nil || string(rec) != string(datas[i]) || len(hs) != len(want)*tlog.HashSize {
				t.Fatalf("record %d: row holds %d hashes (%v), want %d", n, len(hs)/tlog.HashSize, err, len(want))
			}
			for j, h := range want {
				if string(hs[j*tlog.HashSize:(j+1)*tlog.HashSize]) != string(h[:]) {
					t.Fatalf("record %d: hash %d differs from tlog's", n, j)
				}
				stored[tlog.StoredHashIndex(0, n)+int64(j)] = h
			}
		}
		// The head a replicated store keeps decodes to the same position.
		got, err := decodeHead(after.encodeHead())
		if err != nil || got.next != after.next || len(got.front) != len(after.front) {
			t.Fatalf("head after %d records: %+v %v", after.next, got, err)
		}
		for i := range got.front {
			if got.front[i] != after.front[i] {
				t.Fatalf("head after %d records: level %d differs", after.next, i)
			}
		}
		if _, err := decodeHead(after.encodeHead()[:len(after.encodeHead())-tlog.HashSize]); err == nil {
			t.Fatalf("a head missing a level decoded (%d records)", after.next)
		}
		p = after
	}
}
