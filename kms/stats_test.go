package kms_test

import (
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/kms"
)

// TestTokenExpiries: kmsd_tokens_expiring counts long-lived credentials
// about to lapse, not short-lived ones working as made (the review found
// a critical alert paging for every 1 h CI token); renewable ones are
// told apart, revoked and expired ones are left out.
func TestTokenExpiries(t *testing.T) {
	e := newEnv(t, 0)
	var admin string
	if _, err := e.svc.EnsureAdminToken(ctx, func(s string) error { admin = s; return nil }); err != nil {
		t.Fatal(err)
	}
	root, err := e.svc.Authenticate(ctx, admin)
	if err != nil {
		t.Fatal(err)
	}
	mk := func(ttl, maxLife time.Duration) *kms.Token {
		t.Helper()
		_, tok, err := e.svc.CreateToken(ctx, root, kms.TokenRequest{Role: kms.RoleWorker, Keys: []string{"*"}, TTL: ttl, MaxLifetime: maxLife})
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	mk(time.Hour, 0)               // short-lived: never counted
	long := mk(30*24*time.Hour, 0) // lapses in 12 h, after the clock moves
	mk(30*24*time.Hour, 0)
	mk(30*24*time.Hour, 60*24*time.Hour) // renewable past every window
	revoked := mk(30*24*time.Hour, 0)
	if _, err := e.svc.RevokeToken(ctx, root, revoked.ID); err != nil {
		t.Fatal(err)
	}
	e.clock.Add(30*24*time.Hour - 12*time.Hour) // the 30-day tokens have 12 h left
	ex, soonest, err := e.svc.TokenExpiries(ctx, 24*time.Hour, 7*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	for i, w := range []time.Duration{24 * time.Hour, 7 * 24 * time.Hour} {
		if ex[i].Within != w || ex[i].Final != 2 || ex[i].Renewable != 1 {
			t.Errorf("within %v: %+v, want 2 final (the two 30-day tokens) and 1 renewable", w, ex[i])
		}
	}
	if want := long.ExpiresAt; soonest.IsZero() || !soonest.Equal(*want) {
		t.Errorf("soonest final expiry %v, want %v", soonest, want)
	}
}
