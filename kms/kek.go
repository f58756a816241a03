package kms

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// KEKRing is a Sealer whose blobs name the KEK that sealed them: one KEK
// (the primary) seals, every KEK of the ring opens. A KEK rotation makes
// a new primary and then has every secret sealed again under it
// (Service.Rewrap).
type KEKRing interface {
	Sealer
	// KEKID is the primary KEK's id.
	KEKID() string
	// BlobKEK is the id of the KEK a blob is sealed under.
	BlobKEK(blob []byte) (string, error)
}

// RewrapStats counts a rewrap's work.
type RewrapStats struct {
	Keys      int // keys looked at
	Versions  int // versions with a sealed secret looked at
	Rewrapped int // of those, sealed again under the primary
}

// ErrNoRing: the service's sealer is not a KEKRing.
var ErrNoRing = errors.New("the sealer has no KEK ring")

// versionsOf calls fn on every version of the key, newest first.
func (s *Service) versionsOf(ctx context.Context, name string, fn func(*Version) error) error {
	for before := uint64(0); ; {
		_, vs, err := s.store.ListVersions(ctx, name, before, 500)
		if err != nil {
			return asUnavailable("store", err)
		}
		for _, v := range vs {
			if err := fn(v); err != nil {
				return err
			}
			before = v.Number
		}
		if len(vs) < 500 || before <= 1 {
			return nil
		}
	}
}

// eachKey calls fn on every key (internal ones too) with a name after
// `after`, in name order.
func (s *Service) eachKey(ctx context.Context, after string, fn func(*Key) error) error {
	for {
		keys, err := s.store.ListKeys(ctx, after, 100)
		if err != nil {
			return asUnavailable("store", err)
		}
		for _, k := range keys {
			if err := fn(k); err != nil {
				return err
			}
			after = k.Name
		}
		if len(keys) < 100 {
			return nil
		}
	}
}

// Rewrap seals again under the primary KEK every version secret that is
// sealed under another, a key at a time, starting after the key named
// after: each key's versions in one store transaction that checks they
// did not change since they were read, with one audit record of the
// service. The secret is unsealed in memory for the moment it takes to
// seal it again, as any use of the key does; it never leaves the process.
// progress, if set, is called after each key with its name and the counts
// so far; an error from it stops the rewrap.
func (s *Service) Rewrap(ctx context.Context, after string, progress func(key string, st RewrapStats) error) (RewrapStats, error) {
	var st RewrapStats
	ring, ok := s.sealer.(KEKRing)
	if !ok {
		return st, ErrNoRing
	}
	err := s.eachKey(ctx, after, func(k *Key) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		primary := ring.KEKID()
		st.Keys++
		var stale []uint64
		err := s.versionsOf(ctx, k.Name, func(v *Version) error {
			if len(v.Sealed) == 0 {
				return nil
			}
			st.Versions++
			if id, err := ring.BlobKEK(v.Sealed); err != nil || id != primary {
				stale = append(stale, v.Number)
			}
			return nil
		})
		if err != nil {
			return err
		}
		if len(stale) > 0 {
			n := 0
			err = s.store.UpdateKey(ctx, k.Name, func(tx KeyTx) ([]*AuditRecord, error) {
				n = 0
				kind := tx.Key().Kind
				for _, num := range stale {
					v, err := tx.Version(num)
					if err != nil {
						return nil, err
					}
					if len(v.Sealed) == 0 {
						continue // destroyed meanwhile
					}
					if id, err := ring.BlobKEK(v.Sealed); err == nil && id == primary {
						continue // rewrapped meanwhile (another replica)
					}
					sc := SealContext{Key: k.Name, Version: num, Kind: kind}
					secret, err := s.sealer.Unseal(ctx, sc, v.Sealed)
					if err != nil {
						return nil, asUnavailable("hsm", err)
					}
					sealed, err := s.sealer.Seal(ctx, sc, secret)
					secret.Wipe()
					if err != nil {
						return nil, asUnavailable("hsm", err)
					}
					if id, err := ring.BlobKEK(sealed); err != nil || id == "" {
						return nil, fmt.Errorf("rewrap: the sealer's blob names no KEK")
					}
					v.Sealed = sealed
					n++
				}
				if n == 0 || !s.audit {
					return nil, nil
				}
				return []*AuditRecord{{Time: s.clock.Now().UTC().Format(time.RFC3339Nano), Actor: "system", Operation: "kek rewrap", Key: k.Name, Count: uint64(n), Status: 200}}, nil
			})
			if err != nil {
				return fmt.Errorf("rewrap key %s: %w", k.Name, err)
			}
			st.Rewrapped += n
		}
		if progress != nil {
			return progress(k.Name, st)
		}
		return nil
	})
	return st, err
}

// SealedUnder counts the version secrets sealed under each KEK (by id;
// "?" for a blob that names none).
func (s *Service) SealedUnder(ctx context.Context) (map[string]int, error) {
	ring, ok := s.sealer.(KEKRing)
	if !ok {
		return nil, ErrNoRing
	}
	out := map[string]int{}
	err := s.eachKey(ctx, "", func(k *Key) error {
		return s.versionsOf(ctx, k.Name, func(v *Version) error {
			if len(v.Sealed) == 0 {
				return nil
			}
			id, err := ring.BlobKEK(v.Sealed)
			if err != nil {
				id = "?"
			}
			out[id]++
			return nil
		})
	})
	return out, err
}

// sealFence counts new material between its seal and its commit, so that
// a KEK rotation or retire can wait until none is in flight (DrainSeals).
type sealFence struct {
	mu       sync.Mutex // held by a fence: no seal of new material starts
	inflight atomic.Int64
}

// enter marks a seal of new material as started; the returned func marks
// it committed or discarded.
func (f *sealFence) enter() func() {
	f.mu.Lock()
	f.inflight.Add(1)
	f.mu.Unlock()
	var once sync.Once
	return func() { once.Do(func() { f.inflight.Add(-1) }) }
}

// DrainSeals waits until no new material sealed in this process before
// the call is between its seal and its commit (new seals wait only for
// the drain itself, not for what the caller does next). A rotation and a
// retire drain before they count: what this process sealed under an old
// KEK before it followed the switch is then in the store.
func (s *Service) DrainSeals(ctx context.Context) error {
	s.seals.mu.Lock()
	defer s.seals.mu.Unlock()
	for s.seals.inflight.Load() > 0 {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
	return nil
}
