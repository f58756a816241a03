package kms

import (
	"testing"
	"time"
)

// TestTransitions covers every action from every state, primary or not.
func TestTransitions(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	past, future := now.Add(-time.Second), now.Add(time.Hour)
	type tc struct {
		state   State
		primary bool
		action  Action
		at      *time.Time // DestroyAt
		want    State      // "" = refused
	}
	cases := []tc{
		{StateEnabled, false, ActDisable, nil, StateDisabled},
		{StateEnabled, true, ActDisable, nil, ""},
		{StateDisabled, false, ActDisable, nil, ""},
		{StateDestroyScheduled, false, ActDisable, &future, ""},
		{StateDestroyed, false, ActDisable, nil, ""},

		{StateDisabled, false, ActEnable, nil, StateEnabled},
		{StateEnabled, false, ActEnable, nil, ""},
		{StateDestroyScheduled, false, ActEnable, &future, ""},
		{StateDestroyed, false, ActEnable, nil, ""},

		{StateEnabled, false, ActScheduleDestroy, nil, StateDestroyScheduled},
		{StateDisabled, false, ActScheduleDestroy, nil, StateDestroyScheduled},
		{StateEnabled, true, ActScheduleDestroy, nil, ""},
		{StateDestroyScheduled, false, ActScheduleDestroy, &future, ""},
		{StateDestroyed, false, ActScheduleDestroy, nil, ""},

		{StateDestroyScheduled, false, ActCancelDestroy, &future, StateDisabled},
		{StateEnabled, false, ActCancelDestroy, nil, ""},
		{StateDisabled, false, ActCancelDestroy, nil, ""},
		{StateDestroyed, false, ActCancelDestroy, nil, ""},

		{StateDestroyScheduled, false, ActDestroy, &past, StateDestroyed},
		{StateDestroyScheduled, false, ActDestroy, &now, StateDestroyed},
		{StateDestroyScheduled, false, ActDestroy, &future, ""},
		{StateEnabled, false, ActDestroy, nil, ""},
		{StateDisabled, false, ActDestroy, nil, ""},
		{StateDestroyed, false, ActDestroy, nil, ""},

		{StateEnabled, false, ActUse, nil, StateEnabled},
		{StateEnabled, true, ActUse, nil, StateEnabled},
		{StateDisabled, false, ActUse, nil, ""},
		{StateDestroyScheduled, false, ActUse, &future, ""},
		{StateDestroyed, false, ActUse, nil, ""},
	}
	for _, c := range cases {
		v := Version{Number: 2, State: c.state, DestroyAt: c.at}
		k := &Key{Name: "k", Primary: 1, Latest: 2, MinDecryptionVersion: 1}
		if c.primary {
			k.Primary = 2
		}
		got, err := transition(k, &v, c.action, now)
		if c.want == "" {
			if err == nil || KindOf(err) != KindFailedPrecondition {
				t.Errorf("%s on %s (primary %v): got %q, %v; want a failed-precondition refusal", c.action, c.state, c.primary, got, err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("%s on %s (primary %v): got %q, %v; want %q", c.action, c.state, c.primary, got, err, c.want)
		}
	}
}

func TestUseBelowMinDecryptionVersion(t *testing.T) {
	k := &Key{Name: "k", Primary: 3, Latest: 3, MinDecryptionVersion: 2}
	if _, err := transition(k, &Version{Number: 1, State: StateEnabled}, ActUse, time.Now()); err == nil {
		t.Fatal("version 1 is usable below min_decryption_version 2")
	}
	if _, err := transition(k, &Version{Number: 2, State: StateEnabled}, ActUse, time.Now()); err != nil {
		t.Fatal(err)
	}
}

func TestValidateName(t *testing.T) {
	for _, ok := range []string{"a", "0", "key-1", "a.b_c-d", "a23456789012345678901234567890123456789012345678901234567890123"} {
		if err := ValidateName(ok); err != nil {
			t.Errorf("ValidateName(%q) = %v", ok, err)
		}
	}
	for _, bad := range []string{"", "_identity", "-a", ".a", "A", "a/b", "a b", "é", "a\x00", "a2345678901234567890123456789012345678901234567890123456789012345"} {
		if err := ValidateName(bad); KindOf(err) != KindInvalid {
			t.Errorf("ValidateName(%q) = %v, want invalid", bad, err)
		}
	}
}

func TestSealContextAADIsUnambiguous(t *testing.T) {
	a := SealContext{Key: "ab", Version: 1, Kind: "c"}.AAD("k")
	b := SealContext{Key: "a", Version: 1, Kind: "bc"}.AAD("k")
	if string(a) == string(b) {
		t.Fatal("two contexts encode to the same AAD")
	}
}
