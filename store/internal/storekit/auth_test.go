package storekit_test

import (
	"bytes"
	"testing"

	"github.com/kmsd-project/kmsd/store/internal/storekit"
)

func newAuth(t testing.TB, b byte) *storekit.Auth {
	a, err := storekit.NewAuth(bytes.Repeat([]byte{b}, 32))
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// TestTagBindsPathSeqAndBody: a stored record opens at its path only, and
// a change to any byte of it (body, seq or tag) is refused.
func TestTagBindsPathSeqAndBody(t *testing.T) {
	a := newAuth(t, 1)
	stored := a.Seal("t/abc", 7, []byte(`{"role":"reader"}`))
	body, seq, err := a.Open("t/abc", stored)
	if err != nil || seq != 7 || string(body) != `{"role":"reader"}` {
		t.Fatalf("open: %q %d %v", body, seq, err)
	}
	if _, _, err := a.Open("t/abd", stored); storekit.AsTamper(err) == nil {
		t.Fatalf("opened at another path: %v", err)
	}
	for i := range stored {
		c := bytes.Clone(stored)
		c[i] ^= 1
		if _, _, err := a.Open("t/abc", c); storekit.AsTamper(err) == nil {
			t.Fatalf("byte %d flipped: %v", i, err)
		}
	}
	if _, _, err := newAuth(t, 2).Open("t/abc", stored); storekit.AsTamper(err) == nil {
		t.Fatal("opened under another record key")
	}
	if _, _, err := a.Open("t/abc", stored[:10]); storekit.AsTamper(err) == nil {
		t.Fatal("opened a short record")
	}
	if a.Tampered.Load() != uint64(len(stored))+2 { // the other key's refusal counts there
		t.Fatalf("tampered count %d", a.Tampered.Load())
	}
}

// TestDigestMoves: Put and Delete move a transaction's delta so that the
// digest is the sum of the terms of what is stored, whatever the order.
func TestDigestMoves(t *testing.T) {
	a := newAuth(t, 1)
	var d storekit.Digest
	x1, _ := a.Put(&d, "k/x", nil, []byte("1"))
	y1, _ := a.Put(&d, "k/y", nil, []byte("1"))
	x2, err := a.Put(&d, "k/x", x1, []byte("2"))
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Delete(&d, "k/y", y1); err != nil {
		t.Fatal(err)
	}
	if want := a.Term(x2); d != want {
		t.Fatal("digest is not the sum of what is stored")
	}
	if _, seq, _ := a.Open("k/x", x2); seq != 2 {
		t.Fatalf("second write has seq %d", seq)
	}
	// x1 put back: its term differs from x2's.
	if a.Term(x1) == a.Term(x2) {
		t.Fatal("an earlier value has the same term")
	}
	if _, err := a.Put(&d, "k/x", append(bytes.Clone(x2[:len(x2)-1]), 0), []byte("3")); storekit.AsTamper(err) == nil {
		t.Fatal("a write built on a record that fails its tag")
	}
	b := d.Bytes()
	if p, err := storekit.ParseDigest(b); err != nil || p != d {
		t.Fatal("digest does not round-trip")
	}
}

// BenchmarkSealOpen: tagging and checking a 6 KB record (a version's size).
func BenchmarkSealOpen(b *testing.B) {
	a := newAuth(b, 1)
	body := make([]byte, 6000)
	b.SetBytes(int64(len(body)))
	for b.Loop() {
		s := a.Seal("v/bench/0000000000000001", 1, body)
		if _, _, err := a.Open("v/bench/0000000000000001", s); err != nil {
			b.Fatal(err)
		}
	}
}
