package kms

import "time"

// Action is something done to or with one version.
type Action string

const (
	ActDisable         Action = "disable"
	ActEnable          Action = "enable"
	ActScheduleDestroy Action = "schedule-destroy"
	ActCancelDestroy   Action = "cancel-destroy"
	ActDestroy         Action = "destroy" // by the maintenance loop, when due
	ActMakePrimary     Action = "make-primary"
	ActUse             Action = "use" // sign, verify, decapsulate, read public key
)

// transition is the one place that decides whether action may happen to
// version v of key k at time now, and what state it leaves v in. It does not
// change anything: the caller applies the returned state.
func transition(k *Key, v *Version, action Action, now time.Time) (State, error) {
	isPrimary := v.Number == k.Primary
	switch action {
	case ActDisable:
		switch {
		case isPrimary:
			return "", Errorf(KindFailedPrecondition, "version %d is the primary version of key %q: rotate first", v.Number, k.Name)
		case v.State == StateEnabled:
			return StateDisabled, nil
		case v.State == StateDisabled:
			return "", Errorf(KindFailedPrecondition, "version %d of key %q is already disabled", v.Number, k.Name)
		case v.State == StateDestroyScheduled:
			return "", Errorf(KindFailedPrecondition, "version %d of key %q is scheduled for destruction and cannot be used already", v.Number, k.Name)
		}
	case ActEnable:
		switch v.State {
		case StateDisabled:
			return StateEnabled, nil
		case StateEnabled:
			return "", Errorf(KindFailedPrecondition, "version %d of key %q is already enabled", v.Number, k.Name)
		case StateDestroyScheduled:
			return "", Errorf(KindFailedPrecondition, "version %d of key %q is scheduled for destruction: cancel the destroy first", v.Number, k.Name)
		}
	case ActScheduleDestroy:
		switch {
		case isPrimary:
			return "", Errorf(KindFailedPrecondition, "version %d is the primary version of key %q: rotate first", v.Number, k.Name)
		case v.State == StateEnabled, v.State == StateDisabled:
			return StateDestroyScheduled, nil
		case v.State == StateDestroyScheduled:
			return "", Errorf(KindFailedPrecondition, "version %d of key %q is already scheduled for destruction", v.Number, k.Name)
		}
	case ActCancelDestroy:
		if v.State == StateDestroyScheduled {
			// Like Cloud KMS: a restored version comes back disabled, so
			// that using it again is a second, deliberate step.
			return StateDisabled, nil
		}
		if v.State != StateDestroyed {
			return "", Errorf(KindFailedPrecondition, "version %d of key %q is not scheduled for destruction", v.Number, k.Name)
		}
	case ActDestroy:
		if v.State == StateDestroyScheduled && v.DestroyAt != nil && !now.Before(*v.DestroyAt) {
			return StateDestroyed, nil
		}
		if v.State != StateDestroyed {
			return "", Errorf(KindFailedPrecondition, "version %d of key %q is not due for destruction", v.Number, k.Name)
		}
	case ActMakePrimary, ActUse:
		if v.State == StateEnabled {
			if action == ActUse && v.Number < k.MinDecryptionVersion {
				return "", Errorf(KindFailedPrecondition, "version %d of key %q is below min_decryption_version %d", v.Number, k.Name, k.MinDecryptionVersion)
			}
			return v.State, nil
		}
		if v.State != StateDestroyed {
			return "", Errorf(KindFailedPrecondition, "version %d of key %q is %s", v.Number, k.Name, v.State)
		}
	default:
		return "", Errorf(KindInternal, "unknown action %q", action)
	}
	// Every action but the ones handled above is refused on a destroyed
	// version: its material is gone for good.
	return "", Errorf(KindFailedPrecondition, "version %d of key %q is destroyed", v.Number, k.Name)
}
