// Package sealertest is the conformance suite every kms.Sealer runs (the
// PKCS#11 sealer over SoftHSM, and Faulty, the fault-injecting wrapper the
// fault tests use), in the style of circl's TestApi: one list of what a
// sealer must do, run against each implementation.
package sealertest

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/kmsd-project/kmsd/kms"
)

// ErrInjected is what Faulty answers while it is down.
var ErrInjected = errors.New("injected: CKR_DEVICE_ERROR from /dev/hsm0")

// Faulty wraps a sealer and fails every call while Down is set, as an HSM
// that stopped answering would.
type Faulty struct {
	kms.Sealer
	Down *atomic.Bool
}

// NewFaulty wraps s, up.
func NewFaulty(s kms.Sealer) Faulty { return Faulty{Sealer: s, Down: new(atomic.Bool)} }

func (f Faulty) Seal(ctx context.Context, sc kms.SealContext, p kms.Secret) ([]byte, error) {
	if f.Down.Load() {
		return nil, ErrInjected
	}
	return f.Sealer.Seal(ctx, sc, p)
}

func (f Faulty) Unseal(ctx context.Context, sc kms.SealContext, b []byte) (kms.Secret, error) {
	if f.Down.Load() {
		return kms.Secret{}, ErrInjected
	}
	return f.Sealer.Unseal(ctx, sc, b)
}

func (f Faulty) Ping(ctx context.Context) error {
	if f.Down.Load() {
		return ErrInjected
	}
	return f.Sealer.Ping(ctx)
}

// Run checks what every sealer must do. open must not return nil; a setup
// failure is the open function's t.Fatal, never a nil-pointer panic here.
func Run(t *testing.T, open func(t *testing.T) kms.Sealer) {
	ctx := context.Background()
	sc := kms.SealContext{Key: "k", Version: 1, Kind: "ml-dsa-65"}
	seal := func(t *testing.T, s kms.Sealer, b []byte) []byte {
		t.Helper()
		blob, err := s.Seal(ctx, sc, kms.NewSecret(bytes.Clone(b)))
		if err != nil {
			t.Fatal(err)
		}
		return blob
	}
	get := func(t *testing.T) kms.Sealer {
		s := open(t)
		if s == nil {
			t.Fatal("open returned no sealer")
		}
		return s
	}

	t.Run("RoundTrip", func(t *testing.T) {
		s := get(t)
		for _, n := range []int{1, 32, 64, 4096} {
			secret := make([]byte, n)
			rand.Read(secret)
			blob := seal(t, s, secret)
			if n >= 16 && bytes.Contains(blob, secret[:16]) {
				t.Fatalf("the sealed blob holds the secret in the clear (%d bytes)", n)
			}
			got, err := s.Unseal(ctx, sc, blob)
			if err != nil || !bytes.Equal(got.Reveal(), secret) {
				t.Fatalf("%d bytes: unsealed %d bytes, %v", n, got.Len(), err)
			}
		}
	})
	t.Run("FreshBlobs", func(t *testing.T) {
		s := get(t)
		secret := []byte("the same secret, sealed twice...")
		if bytes.Equal(seal(t, s, secret), seal(t, s, secret)) {
			t.Fatal("sealing twice gave the same blob: no fresh data key or nonce")
		}
	})
	t.Run("BoundToContext", func(t *testing.T) {
		s := get(t)
		blob := seal(t, s, []byte("bound to key k, version 1, ml-dsa-65"))
		for _, other := range []kms.SealContext{{Key: "k2", Version: 1, Kind: sc.Kind}, {Key: "k", Version: 2, Kind: sc.Kind}, {Key: "k", Version: 1, Kind: "ml-kem-768"}} {
			if _, err := s.Unseal(ctx, other, blob); err == nil {
				t.Errorf("a blob sealed for %+v opened as %+v", sc, other)
			}
		}
	})
	t.Run("TamperedOrGarbageRefused", func(t *testing.T) {
		s := get(t)
		blob := seal(t, s, []byte("thirty-two bytes of key material"))
		for i := 0; i < len(blob); i += max(1, len(blob)/64) {
			b := bytes.Clone(blob)
			b[i] ^= 0x01
			if _, err := s.Unseal(ctx, sc, b); err == nil {
				t.Fatalf("a blob with byte %d changed opened", i)
			}
		}
		for _, b := range [][]byte{nil, {}, {0}, blob[:len(blob)/2], append(bytes.Clone(blob), 0), bytes.Repeat([]byte{0xff}, len(blob))} {
			if _, err := s.Unseal(ctx, sc, b); err == nil {
				t.Fatalf("garbage of %d bytes opened", len(b))
			}
		}
	})
	t.Run("Ping", func(t *testing.T) {
		if err := get(t).Ping(ctx); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("Concurrent", func(t *testing.T) {
		s := get(t)
		var wg sync.WaitGroup
		errs := make(chan error, 8)
		for g := 0; g < 8; g++ {
			wg.Add(1)
			go func(g int) {
				defer wg.Done()
				for i := 0; i < 10; i++ {
					secret := []byte{byte(g), byte(i), 1, 2, 3, 4, 5, 6}
					c := kms.SealContext{Key: "k", Version: uint64(g*100 + i + 1), Kind: "ml-kem-768"}
					blob, err := s.Seal(ctx, c, kms.NewSecret(bytes.Clone(secret)))
					if err == nil {
						var got kms.Secret
						if got, err = s.Unseal(ctx, c, blob); err == nil && !bytes.Equal(got.Reveal(), secret) {
							err = errors.New("a concurrent unseal returned another secret")
						}
					}
					if err != nil {
						errs <- err
						return
					}
				}
			}(g)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
	})
}

// RunFaulty runs the suite over Faulty wrapping a sealer (up, it must
// behave as the sealer), then checks that down, every call fails with
// ErrInjected and up again, blobs sealed before still open.
func RunFaulty(t *testing.T, open func(t *testing.T) kms.Sealer) {
	Run(t, func(t *testing.T) kms.Sealer { return NewFaulty(open(t)) })
	t.Run("DownAndUp", func(t *testing.T) {
		ctx := context.Background()
		f := NewFaulty(open(t))
		sc := kms.SealContext{Key: "k", Version: 1, Kind: "ml-dsa-65"}
		blob, err := f.Seal(ctx, sc, kms.NewSecret([]byte("sealed before the fault")))
		if err != nil {
			t.Fatal(err)
		}
		f.Down.Store(true)
		if _, err := f.Seal(ctx, sc, kms.NewSecret([]byte("x"))); !errors.Is(err, ErrInjected) {
			t.Errorf("seal while down: %v", err)
		}
		if _, err := f.Unseal(ctx, sc, blob); !errors.Is(err, ErrInjected) {
			t.Errorf("unseal while down: %v", err)
		}
		if err := f.Ping(ctx); !errors.Is(err, ErrInjected) {
			t.Errorf("ping while down: %v", err)
		}
		f.Down.Store(false)
		if got, err := f.Unseal(ctx, sc, blob); err != nil || string(got.Reveal()) != "sealed before the fault" {
			t.Fatalf("after the fault: %v", err)
		}
	})
}
