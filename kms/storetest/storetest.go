// Package storetest is the conformance suite every kms.Store runs: the bbolt
// store now, a distributed one later.
package storetest

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"kmsd/kms"
)

// Run runs the suite; open returns a new, empty store.
func Run(t *testing.T, open func(t *testing.T) kms.Store) {
	ctx := context.Background()
	key := func(name string) *kms.Key {
		now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
		return &kms.Key{Name: name, Kind: "ml-dsa-65", CreatedAt: now, Primary: 1, MinDecryptionVersion: 1,
			Policy:   kms.Policy{DestroyWaitDays: 30},
			Versions: []kms.Version{{Number: 1, State: kms.StateEnabled, CreatedAt: now, PublicKey: []byte("pub"), Sealed: []byte("sealed")}}}
	}

	t.Run("CreateGet", func(t *testing.T) {
		s := open(t)
		if err := s.CreateKey(ctx, key("a")); err != nil {
			t.Fatal(err)
		}
		got, err := s.GetKey(ctx, "a")
		if err != nil || got.Name != "a" || string(got.Versions[0].Sealed) != "sealed" || !got.CreatedAt.Equal(key("a").CreatedAt) {
			t.Fatalf("GetKey: %+v %v", got, err)
		}
		if err := s.CreateKey(ctx, key("a")); !errors.Is(err, kms.ErrAlreadyExists) {
			t.Fatalf("second CreateKey: %v", err)
		}
		if _, err := s.GetKey(ctx, "b"); !errors.Is(err, kms.ErrNotFound) {
			t.Fatalf("GetKey of a missing key: %v", err)
		}
	})

	t.Run("GetReturnsACopy", func(t *testing.T) {
		s := open(t)
		s.CreateKey(ctx, key("a"))
		k, _ := s.GetKey(ctx, "a")
		k.Versions[0].Sealed[0] = 'X'
		k.Primary = 9
		again, _ := s.GetKey(ctx, "a")
		if again.Primary != 1 || string(again.Versions[0].Sealed) != "sealed" {
			t.Fatal("changing a returned key changed the store")
		}
	})

	t.Run("UpdateCommitsOrNothing", func(t *testing.T) {
		s := open(t)
		s.CreateKey(ctx, key("a"))
		boom := errors.New("boom")
		err := s.UpdateKey(ctx, "a", func(k *kms.Key) error {
			k.Primary = 7
			k.Versions = append(k.Versions, kms.Version{Number: 2})
			return boom
		})
		if !errors.Is(err, boom) {
			t.Fatalf("UpdateKey returned %v, want fn's error", err)
		}
		k, _ := s.GetKey(ctx, "a")
		if k.Primary != 1 || len(k.Versions) != 1 {
			t.Fatal("a failed update changed the key")
		}
		if err := s.UpdateKey(ctx, "a", func(k *kms.Key) error { k.Primary = 2; return nil }); err != nil {
			t.Fatal(err)
		}
		if k, _ := s.GetKey(ctx, "a"); k.Primary != 2 {
			t.Fatal("update lost")
		}
		if err := s.UpdateKey(ctx, "zz", func(*kms.Key) error { return nil }); !errors.Is(err, kms.ErrNotFound) {
			t.Fatalf("update of a missing key: %v", err)
		}
		if err := s.UpdateKey(ctx, "a", func(k *kms.Key) error { k.Name = "b"; return nil }); err == nil {
			t.Fatal("a key was renamed")
		}
	})

	t.Run("UpdatesSerialize", func(t *testing.T) {
		s := open(t)
		s.CreateKey(ctx, key("a"))
		var wg sync.WaitGroup
		for i := 0; i < 20; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				s.UpdateKey(ctx, "a", func(k *kms.Key) error {
					k.Versions = append(k.Versions, kms.Version{Number: k.Latest() + 1})
					return nil
				})
			}()
		}
		wg.Wait()
		if k, _ := s.GetKey(ctx, "a"); len(k.Versions) != 21 {
			t.Fatalf("%d versions after 20 concurrent appends, want 21 (lost update)", len(k.Versions))
		}
	})

	t.Run("ListOrderAndPages", func(t *testing.T) {
		s := open(t)
		for _, n := range []string{"c", "a", "b", "d"} {
			s.CreateKey(ctx, key(n))
		}
		var got string
		after := ""
		for {
			ks, err := s.ListKeys(ctx, after, 3)
			if err != nil {
				t.Fatal(err)
			}
			for _, k := range ks {
				got += k.Name
				after = k.Name
			}
			if len(ks) < 3 {
				break
			}
		}
		if got != "abcd" {
			t.Fatalf("listed %q, want abcd", got)
		}
		if ks, _ := s.ListKeys(ctx, "bb", 10); len(ks) != 2 || ks[0].Name != "c" {
			t.Fatalf("ListKeys after a name between keys: %v", ks)
		}
	})

	t.Run("Tokens", func(t *testing.T) {
		s := open(t)
		if n, _ := s.CountTokens(ctx); n != 0 {
			t.Fatalf("%d tokens in a new store", n)
		}
		for i := 0; i < 3; i++ {
			tok := &kms.Token{ID: fmt.Sprintf("%016d", i), Role: kms.RoleWorker, Keys: []string{"*"}, Hash: []byte{byte(i)}}
			if err := s.CreateToken(ctx, tok); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.CreateToken(ctx, &kms.Token{ID: fmt.Sprintf("%016d", 1)}); !errors.Is(err, kms.ErrAlreadyExists) {
			t.Fatalf("duplicate token id: %v", err)
		}
		if n, _ := s.CountTokens(ctx); n != 3 {
			t.Fatalf("CountTokens = %d", n)
		}
		got, err := s.GetToken(ctx, fmt.Sprintf("%016d", 2))
		if err != nil || got.Hash[0] != 2 || got.Role != kms.RoleWorker {
			t.Fatalf("GetToken: %+v %v", got, err)
		}
		if _, err := s.GetToken(ctx, "nope"); !errors.Is(err, kms.ErrNotFound) {
			t.Fatalf("GetToken of a missing id: %v", err)
		}
	})

	t.Run("Ping", func(t *testing.T) {
		if err := open(t).Ping(ctx); err != nil {
			t.Fatal(err)
		}
	})
}
