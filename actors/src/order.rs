//! The order lifecycle: the pure state machine ([`apply`]) and the order actor that owns one
//! open order, persists every transition before acknowledging it, and tells the courier, the
//! dispatcher and the watchers.
//!
//! ```text
//! created ─offer─► offered ─accept─► assigned ─arrive─► at_pickup ─picked_up─► picked_up ─arrive─► at_dropoff ─delivered─► delivered
//!    ▲                │ decline/lapse                                                  (picked_up may skip at_pickup;
//!    └────────────────┘                                                                 delivered may skip at_dropoff)
//! any open state ─cancel─► cancelled;   held states ─fail─► failed;   created/offered ─expire─► expired
//! created/offered/assigned/at_pickup ─assign (override or auto-accept)─► assigned
//! assigned/at_pickup ─release (the courier hands it back; staff also from offered)─► created
//! ```

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::domain::{
    Actor as Who, AssignmentRecord, CourierId, DomainEvent, EntityKind, Ms, Offer, Order, OrderState,
};
use crate::error::FleetError;
use crate::fleet::FleetCtx;
use crate::publish::{CourierNotice, Update};
use crate::store::Write;

/// A command that may change an order.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Offer the order to a courier for `lasts_ms` from when the order takes the offer (not
    /// from the round that chose it: a slow round, or a command queued behind a slow commit,
    /// would reach the courier with little time left, or none, and then count as a decline).
    Offer { courier: CourierId, lasts_ms: Ms, record: AssignmentRecord },
    /// The offered courier accepts.
    Accept { courier: CourierId },
    /// The offered courier declines.
    Decline { courier: CourierId },
    /// The offer lapsed without an answer.
    OfferLapsed { courier: CourierId },
    /// Assign directly (dispatcher override or auto-accept fleet).
    Assign { courier: CourierId, record: AssignmentRecord },
    /// The courier reached the pickup (geofence).
    ArrivedPickup { courier: CourierId },
    /// The courier reports the goods on board.
    PickedUp { courier: CourierId },
    /// The courier reached the drop-off (geofence).
    ArrivedDropoff { courier: CourierId },
    /// The courier reports delivery.
    Delivered { courier: CourierId },
    /// The courier reports failure.
    Failed { courier: CourierId },
    /// Hand the order back to dispatch before pickup: from the holding courier (`Some`, while
    /// assigned or at the pickup; sent by the courier itself, or by the system for a courier
    /// gone silent) or whoever has it (`None`, staff; also withdraws an offer). The courier is
    /// not offered the order again; its wait for a courier restarts.
    Release { courier: Option<CourierId> },
    /// Cancel (customer before pickup, dispatcher or admin any time while open).
    Cancel,
    /// Nobody took the order in time; `why`, when the dispatcher knows more (no courier of
    /// the tenant can carry it), is the event's reason.
    Expire { why: Option<String> },
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Offer { .. } => "offer",
            Command::Accept { .. } => "accept",
            Command::Decline { .. } => "decline",
            Command::OfferLapsed { .. } => "lapse the offer of",
            Command::Assign { .. } => "assign",
            Command::ArrivedPickup { .. } => "arrive at the pickup of",
            Command::PickedUp { .. } => "pick up",
            Command::ArrivedDropoff { .. } => "arrive at the drop-off of",
            Command::Delivered { .. } => "deliver",
            Command::Failed { .. } => "fail",
            Command::Release { .. } => "release",
            Command::Cancel => "cancel",
            Command::Expire { .. } => "expire",
        }
    }
}

/// Applies `cmd` by `who` at `now`; returns the new order or why not. Pure: no I/O.
pub fn apply(order: &Order, cmd: &Command, who: &Who, now: Ms) -> Result<Order, FleetError> {
    use OrderState::*;
    let s = order.state;
    let err = || FleetError::transition(cmd.name(), s);
    let holder_is = |c: &CourierId| order.courier.as_ref() == Some(c);
    let mut next = order.clone();
    match cmd {
        Command::Offer { courier, lasts_ms, record } => {
            if s != Created {
                return Err(err());
            }
            if order.declined.contains(courier) {
                return Err(FleetError::Conflict(format!("courier {courier} declined this order")));
            }
            next.state = Offered;
            next.offer = Some(Offer { courier: courier.clone(), expires_at: now.saturating_add((*lasts_ms).max(0)) });
            next.assignment = Some(record.clone());
        }
        Command::Accept { courier } => {
            let offered_to = order.offer.as_ref().map(|o| &o.courier);
            if s != Offered || offered_to != Some(courier) {
                return Err(err());
            }
            // Past its time the offer is lapsed, whether or not the dispatcher's tick has
            // said so yet: a late accept took an order the dispatcher was about to give away
            // (and that a reconnecting app is no longer shown).
            if order.offer.as_ref().is_some_and(|o| now > o.expires_at) {
                return Err(FleetError::Conflict(format!("the offer to {courier} expired")));
            }
            next.state = Assigned;
            next.courier = Some(courier.clone());
            next.offer = None;
        }
        Command::Decline { courier } | Command::OfferLapsed { courier } => {
            let offered_to = order.offer.as_ref().map(|o| &o.courier);
            if s != Offered || offered_to != Some(courier) {
                return Err(err());
            }
            // A lapse decided on a view older than the offer's time (moved on when applied).
            if matches!(cmd, Command::OfferLapsed { .. }) && order.offer.as_ref().is_some_and(|o| now < o.expires_at) {
                return Err(FleetError::Conflict(format!("the offer to {courier} has not lapsed")));
            }
            next.state = Created;
            next.offer = None;
            next.assignment = None;
            if !next.declined.contains(courier) {
                next.declined.push(courier.clone());
            }
        }
        Command::Assign { courier, record } => {
            // A dispatcher's override may move a held order; the dispatch round (the system)
            // assigns only an unassigned one: its view of the order may be a round old.
            let allowed = if matches!(who, Who::System) { matches!(s, Created) } else { matches!(s, Created | Offered | Assigned | AtPickup) };
            if !allowed {
                return Err(err());
            }
            next.state = Assigned;
            next.courier = Some(courier.clone());
            next.offer = None;
            next.assignment = Some(record.clone());
        }
        Command::ArrivedPickup { courier } => {
            if s != Assigned || !holder_is(courier) {
                return Err(err());
            }
            next.state = AtPickup;
        }
        Command::PickedUp { courier } => {
            if !matches!(s, Assigned | AtPickup) || !holder_is(courier) {
                return Err(err());
            }
            next.state = PickedUp;
        }
        Command::ArrivedDropoff { courier } => {
            if s != PickedUp || !holder_is(courier) {
                return Err(err());
            }
            next.state = AtDropoff;
        }
        Command::Delivered { courier } => {
            if !matches!(s, PickedUp | AtDropoff) || !holder_is(courier) {
                return Err(err());
            }
            next.state = Delivered;
        }
        Command::Failed { courier } => {
            if !s.is_held() || !holder_is(courier) {
                return Err(err());
            }
            next.state = Failed;
        }
        Command::Release { courier } => {
            let allowed = match courier {
                Some(c) => matches!(s, Assigned | AtPickup) && holder_is(c),
                None => matches!(s, Offered | Assigned | AtPickup),
            };
            if !allowed {
                return Err(err());
            }
            if let Some(c) = order.commitment()
                && !next.declined.contains(c)
            {
                next.declined.push(c.clone());
            }
            next.state = Created;
            next.courier = None;
            next.offer = None;
            next.assignment = None;
            next.released_at = Some(now);
        }
        Command::Cancel => {
            if s.is_terminal() {
                return Err(err());
            }
            if matches!(who, Who::Customer(_)) && s.is_on_board() {
                return Err(FleetError::Forbidden("a customer cannot cancel an order already picked up".into()));
            }
            next.state = Cancelled;
            next.offer = None;
        }
        Command::Expire { .. } => {
            if !matches!(s, Created | Offered) {
                return Err(err());
            }
            next.state = Expired;
            next.offer = None;
        }
    }
    next.updated_at = now;
    next.version += 1;
    Ok(next)
}

/// The audit event for a transition from `before` to `after`.
pub fn transition_event(before: &Order, after: &Order, cmd: &Command, who: &Who, ts: Ms) -> DomainEvent {
    let mut attrs = vec![
        ("from".to_string(), before.state.as_str().to_string()),
        ("to".to_string(), after.state.as_str().to_string()),
    ];
    // A release names the courier the order left.
    let released = matches!(cmd, Command::Release { .. }).then(|| before.commitment()).flatten();
    if let Some(c) = after.courier.as_ref().or(after.offer.as_ref().map(|o| &o.courier)).or(released) {
        attrs.push(("courier".into(), c.to_string()));
    }
    let reason = match cmd {
        Command::Decline { courier } => Some(format!("declined by {courier}")),
        Command::OfferLapsed { courier } => Some(format!("offer to {courier} lapsed")),
        Command::Assign { record, .. } => Some(format!("assigned by {} policy", record.policy)),
        Command::Offer { record, .. } => Some(format!("offered by {} policy, cost {:.0} s", record.policy, record.cost_s)),
        Command::Expire { why } => Some(why.clone().unwrap_or_else(|| "no courier took the order in time".into())),
        Command::Release { courier: Some(c) } if matches!(who, Who::Courier(_)) => Some(format!("handed back by {c}")),
        Command::Release { courier: Some(c) } => Some(format!("taken back from {c}: no position from it for too long")),
        Command::Release { courier: None } => before.commitment().map(|c| format!("taken back from {c}")),
        _ => None,
    };
    DomainEvent {
        tenant: after.tenant.clone(),
        entity: EntityKind::Order,
        entity_id: after.id.to_string(),
        kind: format!("order.{}", match cmd {
            // Back to `created`, but not a new order: webhooks on `order.created` must not fire,
            // nor a console count a new order. (Before, a decline and a lapsed offer were logged
            // as `order.created`, once per courier that let the order go.)
            Command::Release { .. } => "released",
            Command::Decline { .. } => "declined",
            Command::OfferLapsed { .. } => "offer_lapsed",
            _ if before.state == after.state => "reassigned",
            _ => after.state.as_str(),
        }),
        actor: who.to_string(),
        reason,
        ts,
        attrs,
    }
}

/// Messages of the order actor.
pub enum OrderMsg {
    /// Apply a command; answers with the new order once it is durable. A command still
    /// waiting in the mailbox at `start_by` is not applied (answered with a timeout): its
    /// caller has been told it failed, or is about to be.
    Apply { cmd: Command, who: Who, reply: Option<RpcReplyPort<Result<Arc<Order>, FleetError>>>, start_by: Option<std::time::Instant> },
    /// Read the current order.
    Get(RpcReplyPort<Arc<Order>>),
    /// Test hook: make the actor panic (supervision tests).
    Crash,
}

/// The order actor.
pub struct OrderActor;

/// Arguments: the shared context and the order (already durable).
pub struct OrderArgs {
    pub ctx: Arc<FleetCtx>,
    pub order: Order,
}

pub struct OrderActorState {
    ctx: Arc<FleetCtx>,
    order: Arc<Order>,
}

impl Actor for OrderActor {
    type Msg = OrderMsg;
    type State = OrderActorState;
    type Arguments = OrderArgs;

    async fn pre_start(&self, _me: ActorRef<OrderMsg>, args: OrderArgs) -> Result<Self::State, ActorProcessingErr> {
        Ok(OrderActorState { ctx: args.ctx, order: Arc::new(args.order) })
    }

    async fn handle(&self, me: ActorRef<OrderMsg>, msg: OrderMsg, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match msg {
            OrderMsg::Get(reply) => {
                let _ = reply.send(st.order.clone());
            }
            OrderMsg::Crash => panic!("injected crash in order actor {}", st.order.id),
            OrderMsg::Apply { cmd, who, reply, start_by } => {
                if start_by.is_some_and(|t| std::time::Instant::now() >= t) {
                    tracing::debug!(order = %st.order.id, cmd = cmd.name(), "command waited too long to start; not applied");
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(FleetError::Timeout("order")));
                    }
                    return Ok(());
                }
                let res = transition(st, &cmd, &who).await;
                let done = res.as_ref().map(|o| o.state.is_terminal()).unwrap_or(false);
                if let Some(reply) = reply {
                    let _ = reply.send(res);
                } else if let Err(e) = res {
                    tracing::debug!(order = %st.order.id, error = %e, "order command refused");
                }
                if done {
                    st.ctx.order_closed(&st.order);
                    me.stop(None);
                }
            }
        }
        Ok(())
    }
}

async fn transition(st: &mut OrderActorState, cmd: &Command, who: &Who) -> Result<Arc<Order>, FleetError> {
    let now = st.ctx.clock.now_ms();
    let before = st.order.clone();
    let after = apply(&before, cmd, who, now)?;
    let event = transition_event(&before, &after, cmd, who, now);
    // Capacity: reserve on the new courier before the change is durable, release the old one
    // after. A failed reservation refuses the transition and changes nothing.
    let (was, will) = (before.commitment().cloned(), after.commitment().cloned());
    let moved = was != will;
    if moved && let Some(c) = &will {
        st.ctx.reserve(&after.tenant, c, after.size)?;
    }
    if let Err(e) = st.ctx.store.commit(vec![Write::Order(after.clone()), Write::Event(event.clone())]).await {
        if moved && let Some(c) = &will {
            st.ctx.release(&after.tenant, c, after.size);
        }
        return Err(e.into());
    }
    if moved && let Some(c) = &was {
        st.ctx.release(&before.tenant, c, before.size);
    }
    let after = Arc::new(after);
    st.order = after.clone();
    st.ctx.last_orders.insert((after.tenant.clone(), after.id.clone()), after.clone());
    metrics::counter!("hexfleet_order_transitions_total", "to" => after.state.as_str()).increment(1);
    if matches!(cmd, Command::Release { .. }) && matches!(who, Who::System) {
        metrics::counter!("hexfleet_orders_released_from_silent_total").increment(1);
    }
    st.ctx.note_offer(Some(&before), &after);
    // Tell the couriers involved. A courier that lost the order (reassignment, cancel) is told too.
    let prev_holder = before.courier.clone().or(before.offer.as_ref().map(|o| o.courier.clone()));
    let new_holder = after.courier.clone().filter(|_| after.state.is_held());
    if let Some(prev) = prev_holder.as_ref().filter(|p| Some(*p) != new_holder.as_ref()) {
        st.ctx.courier_order_changed(prev, &after);
    }
    if let Some(c) = &new_holder {
        st.ctx.courier_order_changed(c, &after);
    }
    match cmd {
        Command::Offer { courier, .. } => st.ctx.publisher.publish(Update::ToCourier {
            tenant: after.tenant.clone(),
            courier: courier.clone(),
            notice: CourierNotice::Offer {
                order: after.id.clone(),
                pickup: after.pickup,
                dropoff: after.dropoff,
                expires_at: after.offer.as_ref().map_or(now, |o| o.expires_at),
            },
        }),
        Command::Accept { courier } | Command::Assign { courier, .. } => st.ctx.publisher.publish(Update::ToCourier {
            tenant: after.tenant.clone(),
            courier: courier.clone(),
            notice: CourierNotice::Assigned { order: after.id.clone(), pickup: after.pickup, dropoff: after.dropoff },
        }),
        _ => {}
    }
    st.ctx.publisher.publish(Update::Order(after.clone()));
    st.ctx.publisher.publish(Update::Event(Arc::new(event)));
    st.ctx.dispatch_order_changed(&after);
    Ok(after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{LatLng, OrderId, TenantId};

    fn held_by(c: &str) -> Order {
        let p = LatLng::new(45.5, -73.57).unwrap();
        Order {
            tenant: TenantId::new("t"),
            id: OrderId::new("o1"),
            pickup: p,
            dropoff: p,
            size: 1,
            ready_at: None,
            deliver_by: None,
            state: OrderState::Assigned,
            courier: Some(CourierId::new(c)),
            offer: None,
            declined: Vec::new(),
            assignment: None,
            created_at: 0,
            updated_at: 0,
            version: 1,
            released_at: None,
        }
    }

    /// With auto-accept, a dispatch round whose view of an order is a round old (its change
    /// notice was still queued) must not reassign it; a dispatcher's override may.
    #[test]
    fn only_an_override_reassigns_a_held_order() {
        let o = held_by("x");
        let record = AssignmentRecord { at: 0, policy: "optimal".into(), courier: CourierId::new("y"), cost_s: 0.0, candidates: Vec::new() };
        let cmd = Command::Assign { courier: CourierId::new("y"), record };
        assert!(matches!(apply(&o, &cmd, &Who::System, 1), Err(FleetError::InvalidTransition { .. })));
        let moved = apply(&o, &cmd, &Who::Dispatcher("d".into()), 1).unwrap();
        assert_eq!(moved.courier, Some(CourierId::new("y")));
        let mut created = o.clone();
        (created.state, created.courier) = (OrderState::Created, None);
        assert_eq!(apply(&created, &cmd, &Who::System, 1).unwrap().state, OrderState::Assigned);
    }

    /// A take-back names the courier it is from: the system's, decided from a view a notice
    /// old, must not take the order from a courier it has moved to meanwhile.
    #[test]
    fn a_release_from_a_courier_that_no_longer_holds_the_order_is_refused() {
        let o = held_by("b");
        let from_a = Command::Release { courier: Some(CourierId::new("a")) };
        assert!(matches!(apply(&o, &from_a, &Who::System, 1), Err(FleetError::InvalidTransition { .. })));
        let from_b = Command::Release { courier: Some(CourierId::new("b")) };
        let back = apply(&o, &from_b, &Who::System, 1).unwrap();
        assert_eq!((back.state, back.declined.clone(), back.released_at), (OrderState::Created, vec![CourierId::new("b")], Some(1)));
    }

    /// An offer lasts its time from when the order takes it, however long ago the round that
    /// chose it ran (a slow round, a command queued behind a slow commit); a lapse decided on
    /// an older view is refused until the offer's time is really up.
    #[test]
    fn an_offer_lasts_from_when_it_is_made_and_lapses_only_after() {
        let mut o = held_by("x");
        (o.state, o.courier) = (OrderState::Created, None);
        let c = CourierId::new("c");
        let record = AssignmentRecord { at: 1_000, policy: "optimal".into(), courier: c.clone(), cost_s: 0.0, candidates: Vec::new() };
        // Chosen at 1 s, taken at 16 s: the 20 s run from 16 s.
        let offered = apply(&o, &Command::Offer { courier: c.clone(), lasts_ms: 20_000, record }, &Who::System, 16_000).unwrap();
        assert_eq!(offered.offer.as_ref().map(|x| x.expires_at), Some(36_000));
        let lapse = Command::OfferLapsed { courier: c.clone() };
        assert!(matches!(apply(&offered, &lapse, &Who::System, 35_999), Err(FleetError::Conflict(_))));
        let accepted = apply(&offered, &Command::Accept { courier: c.clone() }, &Who::Courier(c.clone()), 35_999).unwrap();
        assert_eq!(accepted.state, OrderState::Assigned);
        let lapsed = apply(&offered, &lapse, &Who::System, 36_000).unwrap();
        assert_eq!((lapsed.state, lapsed.declined.clone()), (OrderState::Created, vec![c]));
    }
}
